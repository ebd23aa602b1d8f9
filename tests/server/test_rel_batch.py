"""One bad item among batch-mates (docs/reliability.md row 19): an FP32 input carrying NaN or infinity, or the
wrong shape, is refused on its own (4xx) while the requests batched around it succeed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from mone.server.http.app import create_app
from tests.support.media import fashion_images, png
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio
BODY = png(fashion_images(1)[0])


@pytest.fixture(scope="module")
async def app(checkpoint_dir: Path) -> AsyncIterator[FastAPI]:
    application = create_app(fast_settings(checkpoint_dir, calibrate=False, max_batch_wait_ms=20.0))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30
    ) as c:
        yield c


def fp32(value: str, n: int = 784, shape: tuple[int, ...] = (1, 1, 28, 28)) -> bytes:
    """A raw OIP body (JSON allows no NaN, so the literal is written by hand, as a hostile client would)."""
    data = ",".join([value] + ["0.0"] * (n - 1))
    tensor = f'{{"name": "pixels", "shape": {list(shape)}, "datatype": "FP32", "data": [{data}]}}'
    return ('{"inputs": [' + tensor + "]}").encode()


BAD = {
    "nan": fp32("NaN"),
    "infinity": fp32("Infinity"),
    "minus_infinity": fp32("-Infinity"),
    "huge": fp32("1e39"),
    "wrong_shape": fp32("0.0", n=3 * 784, shape=(1, 3, 28, 28)),
}


@pytest.mark.parametrize("name", sorted(BAD))
async def test_rel_bad_item_fails_alone_and_batch_mates_succeed(
    app: FastAPI, client: httpx.AsyncClient, name: str
) -> None:
    good = [client.post("/v1/classify", content=BODY) for _ in range(4)]
    bad = client.post(
        "/v2/models/mone/infer", content=BAD[name], headers={"content-type": "application/json"}
    )
    *oks, refused = await asyncio.gather(*good, bad)
    assert [r.status_code for r in oks] == [200] * 4
    assert 400 <= refused.status_code < 500, (refused.status_code, refused.text[:300])
    s = app.state.engine.stats
    assert s.inflight == 0
