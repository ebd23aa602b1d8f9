"""The engine's public face, the request object and the one request pipeline.

The HTTP layer reaches the engine only through its public methods; every inference request, native or Open
Inference Protocol, is an `InferRequest` whose kind is what decoding found; the error body has one builder.
"""

from __future__ import annotations

import base64
import hmac
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI

from mone.model import MoNE, MoNEConfig, save_checkpoint
from mone.server.core.budget import Budget
from mone.server.core.engine import Engine
from mone.server.core.request import InferRequest
from mone.server.errors import error_body
from mone.server.http import auth
from mone.server.http.access import AccessRecord
from mone.server.http.app import create_app
from mone.server.http.pipeline import Options, Pipeline, Sample
from tests.support.media import encode_clip, fashion_images, png
from tests.support.models import LABELS, fast_settings

pytestmark = pytest.mark.anyio
SERVER = Path(__file__).resolve().parents[2] / "server"
INTERNALS = re.compile(r"engine\.(runner|planner|latency|settings|scheduler|stats|decode_budget|_\w+)\b")


def test_the_http_layer_uses_only_the_engines_public_face() -> None:
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted((SERVER / "http").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if INTERNALS.search(line)
    ]
    assert offenders == []


def test_core_and_media_never_import_http() -> None:
    for room in ("core", "media"):
        for path in (SERVER / room).glob("*.py"):
            assert "mone.server.http" not in path.read_text(), path


def test_only_the_pipeline_decodes_and_submits() -> None:
    """The adapters hand samples to the pipeline; none decodes or submits to the engine itself."""
    stages = re.compile(r"engine\.(classify|submit)\(|(?<![.\w])decode\(|BudgetedDecoder|PixelBudget")
    for path in sorted((SERVER / "http").glob("*.py")):
        if path.name != "pipeline.py":
            assert not [line for line in path.read_text().splitlines() if stages.search(line)], path.name


async def test_the_api_key_is_checked_once(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    app = create_app(fast_settings(checkpoint_dir, api_key="k-0123456789"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # no lifespan: no engine
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        for path in ("/v1/models", "/v2/models/mone"):
            calls.clear()
            await c.get(path, headers={"authorization": "Bearer k-0123456789"})
            assert calls == [b"k-0123456789"], path


def test_a_request_knows_its_kind_and_frames() -> None:
    image = InferRequest(torch.zeros(1, 1, 28, 28), "image", Budget("default", 1.0))
    clip = InferRequest(torch.zeros(1, 1, 28, 28), "clip", Budget("default", 1.0))
    assert (image.kind, image.frames, clip.kind, clip.frames) == ("image", 1, "clip", 1)
    with pytest.raises(ValueError, match="an image has one frame"):
        InferRequest(torch.zeros(2, 1, 28, 28), "image", Budget("default", 1.0))
    with pytest.raises(ValueError, match=r"\(T, C, H, W\)"):
        InferRequest(torch.zeros(1, 28, 28), "image", Budget("default", 1.0))
    with pytest.raises(ValueError, match="kind"):
        InferRequest(torch.zeros(1, 1, 28, 28), "video", Budget("default", 1.0))  # type: ignore[arg-type]


def test_one_error_body_for_both_protocols() -> None:
    assert error_body("overloaded", "full", {"retry_after_s": 1.0}) == {
        "error": {"code": "overloaded", "message": "full", "detail": {"retry_after_s": 1.0}}
    }
    assert error_body("unauthorized", "no key", oip=True) == {
        "error": "no key",
        "code": "unauthorized",
        "detail": {},
    }


@pytest.fixture(scope="module")
async def one_frame_app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    """A model whose clips are one frame long: a clip and an image have the same shape."""
    torch.manual_seed(0)
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10, num_frames=1)).eval()
    path = tmp_path_factory.mktemp("one-frame")
    save_checkpoint(path, net, labels=LABELS)
    application = create_app(fast_settings(path, calibrate=False))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def one_frame_client(one_frame_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=one_frame_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c


async def test_a_one_frame_clip_answers_kind_clip(one_frame_client: httpx.AsyncClient) -> None:
    clip = await one_frame_client.post(
        "/v1/classify", files={"file": ("c.mp4", encode_clip(fashion_images(4)), "video/mp4")}
    )
    assert clip.status_code == 200, clip.text
    assert (clip.json()["kind"], clip.json()["frames"]) == ("clip", 1)
    image = await one_frame_client.post("/v1/classify", content=png(fashion_images(1)[0]))
    assert image.status_code == 200, image.text
    assert (image.json()["kind"], image.json()["frames"]) == ("image", 1)


async def test_the_pipeline_serves_pixels_and_payloads_with_their_kinds(one_frame_app: FastAPI) -> None:
    pipeline: Pipeline = one_frame_app.state.pipeline
    engine: Engine = pipeline.engine
    x = torch.zeros(1, engine.cfg.in_chans, engine.cfg.img_size, engine.cfg.img_size)
    options = Options(Budget("capacity", 0.5), top_k=2)
    record = AccessRecord("pipe-1")
    served = await pipeline.classify(
        [
            Sample(x, "clip", options),
            Sample(png(fashion_images(1)[0]), "auto", lambda: Options(Budget("capacity", 1.0), top_k=1)),
        ],
        arrival=time.monotonic(),
        record=record,
    )
    clip, image = served.results
    assert (clip.kind, image.kind) == ("clip", "image")
    assert (clip.request.id, image.request.id) == ("pipe-1", "pipe-1")
    assert (len(clip.output.top_indices), len(image.output.top_indices)) == (2, 1)
    assert (clip.level.capacity, image.level.capacity) == (0.5, 1.0)
    assert (record.kind, record.samples) == ("mixed", 2)


async def test_the_engine_describes_itself(one_frame_app: FastAPI) -> None:
    engine: Engine = one_frame_app.state.engine
    d = engine.describe()
    assert (d.labels, d.ready, d.device) == (LABELS, True, "cpu")
    assert d.floor_gflops["image"] < d.dense_gflops["image"]
    [point] = engine.profile([0.5])
    assert point.counts == engine.planner.level_of(0.5, 1).counts
    assert point.costs["image"].gflops == engine.planner.level_of(0.5, 1).gflops


async def test_an_oip_request_reports_its_undecodable_input_before_its_bad_budget(
    one_frame_client: httpx.AsyncClient,
) -> None:
    body = {
        "inputs": [
            {"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"no").decode()]}
        ],
        "parameters": {"capacity": 5},
    }
    r = await one_frame_client.post("/v2/models/mone/infer", json=body)
    assert (r.status_code, r.json()["code"]) == (415, "unsupported_media_type")
