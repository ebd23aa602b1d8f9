"""Limits, auth and overload over HTTP, with an app configured with small limits and a slowed model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

import mone.server.http.routes
from mone.server.http.app import create_app
from tests.support.media import encode, fashion_images, png
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio
KEY = "s3cret-token"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
async def app(checkpoint_dir: Path) -> AsyncIterator[FastAPI]:
    settings = fast_settings(
        checkpoint_dir,
        calibrate=False,
        max_body_bytes=4000,
        max_image_bytes=3000,
        max_image_pixels=100 * 100,
        max_batch_size=1,
        max_batch_wait_ms=0.0,
        max_queue_size=2,
        api_key=KEY,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        run = application.state.engine.runner.run

        def slow(*args: Any) -> Any:
            time.sleep(0.05)
            return run(*args)

        application.state.engine.runner.run = slow
        yield application


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=AUTH
    ) as c:
        yield c


def code_of(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/models", "/v2/models/mone", "/v2/models/mone/infer"])
async def test_auth_is_required_on_inference_and_model_routes(client: httpx.AsyncClient, path: str) -> None:
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}):
        r = await client.request(
            "POST" if "infer" in path or "classify" in path else "GET", path, headers=headers
        )
        assert r.status_code == 401
    assert (await client.get("/healthz", headers={"authorization": ""})).status_code == 200


async def test_declared_body_over_limit_is_413_before_reading(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/classify", content=b"\0" * 5000, headers={"content-type": "image/png"})
    assert r.status_code == 413
    assert code_of(r) == "too_large"
    metrics = (await client.get("/metrics")).text
    assert 'mone_requests_total{code="413",route="/v1/classify"}' in metrics
    ok = await client.post(
        "/v1/classify", content=png(fashion_images(1)[0]), headers={"content-type": "image/png"}
    )
    assert ok.status_code == 200, "the server must stay healthy after a refused upload"


async def test_chunked_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\0" * 1000

    r = await client.post("/v1/classify", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413


async def test_image_limits(client: httpx.AsyncClient) -> None:
    big = encode(Image.new("L", (200, 200)), "PNG")  # small file, too many pixels
    r = await client.post("/v1/classify", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413
    noisy = encode(Image.effect_noise((60, 60), 100).convert("L"), "PNG")  # > max_image_bytes
    assert 3000 < len(noisy) < 4000
    assert (await client.post("/v1/classify", content=noisy)).status_code == 413


async def test_overload_gives_429_with_retry_after(client: httpx.AsyncClient) -> None:
    data = png(fashion_images(1)[0])
    rs = await asyncio.gather(*(client.post("/v1/classify", content=data) for _ in range(10)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}
    assert codes.count(429) >= 1
    assert codes.count(200) >= 2
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert code_of(r) == "overloaded"


async def test_overloaded_server_refuses_before_decoding(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A full queue answers 429 without decoding: bytes that would be a 415 still get the 429."""
    engine = app.state.engine
    full = engine._batcher.full
    engine._batcher.full = lambda: True
    try:
        r = await client.post("/v1/classify", content=b"definitely not an image")
        oip = await client.post(
            "/v2/models/mone/infer",
            json={"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]}]},
        )
    finally:
        engine._batcher.full = full
    assert r.status_code == 429, r.text
    assert code_of(r) == "overloaded"
    assert oip.status_code == 429, oip.text
    assert (await client.post("/v1/classify", content=b"definitely not an image")).status_code == 415


async def test_overloaded_server_refuses_before_parsing_the_body(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under overload the body is dropped unparsed: a malformed multipart upload and an OIP body that fails
    the schema both get 429 (not 400 / 422), the route never runs, the connection stays usable, and a body
    over the limit is still a 413."""

    async def never(*args: Any) -> Any:
        raise AssertionError("the body was read by the route")

    engine = app.state.engine
    full = engine._batcher.full
    monkeypatch.setattr(mone.server.http.routes, "_read_input", never)
    engine._batcher.full = lambda: True
    try:
        multipart = await client.post(
            "/v1/classify",
            content=b"--x\r\nnot a part",
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        oip = await client.post("/v2/models/mone/versions/1/infer", json={"inputs": "not a list"})

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"\0" * 500

        streamed = await client.post("/v1/classify", content=chunks())
        too_big = await client.post("/v1/classify", content=b"\0" * 5000)
    finally:
        engine._batcher.full = full
    for r in (multipart, oip, streamed):
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
    assert code_of(multipart) == "overloaded"
    assert oip.json()["code"] == "overloaded"  # the OIP error body under /v2
    assert too_big.status_code == 413
    metrics = (await client.get("/metrics")).text
    assert 'mone_requests_total{code="429",route="/v1/classify"}' in metrics
    monkeypatch.undo()
    ok = await client.post("/v1/classify", content=png(fashion_images(1)[0]))
    assert ok.status_code == 200


async def test_hard_deadline_is_504(client: httpx.AsyncClient) -> None:
    data = png(fashion_images(1)[0])
    busy = [asyncio.ensure_future(client.post("/v1/classify", content=data)) for _ in range(2)]
    await asyncio.sleep(0.01)
    r = await client.post("/v1/classify?deadline_ms=1", content=data)
    await asyncio.gather(*busy)
    assert r.status_code == 504
    assert code_of(r) == "deadline_exceeded"


async def test_accounting_identity_after_all_of_the_above(app: FastAPI) -> None:
    s = app.state.engine.stats
    assert s.accepted > 0
    assert s.accepted == s.succeeded + s.failed + s.cancelled
    assert s.inflight == 0


async def test_health_and_metrics_answer_while_the_model_computes(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    engine = app.state.engine
    run = engine.runner.run

    def busy(*args: Any) -> Any:
        time.sleep(0.6)  # a long batch, on the worker thread
        return run(*args)

    engine.runner.run = busy
    try:
        work = asyncio.ensure_future(client.post("/v1/classify", content=png(fashion_images(1)[0])))
        await asyncio.sleep(0.1)
        for path in ("/healthz", "/metrics", "/readyz"):
            start = time.perf_counter()
            r = await client.get(path)
            assert r.status_code == 200
            assert time.perf_counter() - start < 0.3, f"{path} waited for the model"
        assert not work.done()
        assert (await work).status_code == 200
    finally:
        engine.runner.run = run
