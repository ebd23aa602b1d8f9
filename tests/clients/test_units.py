"""Client pieces that need no model: media encoding, error mapping, retries against a stub, bench mixes."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from mone.clients import (
    AsyncMoneClient,
    BadRequest,
    MoneClient,
    NotReady,
    Overloaded,
    RetryPolicy,
    Timeout,
    TransportError,
)
from mone.clients.bench import Budget, Report, Sample, parse_mix
from mone.clients.cli import build_parser
from mone.clients.errors import from_response
from mone.clients.media import is_clip, sniff, to_payload
from mone.clients.routing import render
from mone.clients.schemas import NAMED_BUDGETS, BudgetKindInfo, ModelInfo, budget_kinds
from tests.support.media import clip_frames, picture

OK_BODY = {
    "model": "mone",
    "kind": "image",
    "frames": 1,
    "requested": {"type": "capacity", "value": 0.5},
    "served": {
        "capacity": 0.5,
        "realised_capacity": 0.49,
        "capacity_distribution": [0.25, 0.25, 0.25, 0.25],
        "expert_counts": [12, 12, 12, 13],
        "gflops": 0.06,
        "dense_gflops": 0.12,
        "degraded": False,
    },
    "timing": {"decode_ms": 1.0, "queue_ms": 1.0, "compute_ms": 2.0, "total_ms": 4.0},
    "batch_size": 1,
    "top_k": [{"label": "shirt", "index": 6, "prob": 0.9}],
}


class Stub(BaseHTTPRequestHandler):
    """Answers /v1/classify with the statuses queued in `script`, then 200; records arrival times."""

    script: list[tuple[int, dict[str, str]]] = []
    arrivals: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Stub.arrivals.append(time.monotonic())
        status, headers = Stub.script.pop(0) if Stub.script else (200, {})
        if "x-stall" in headers:
            time.sleep(float(headers.pop("x-stall")))
        body = OK_BODY if status == 200 else {"error": {"code": "overloaded", "message": "queue full"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {**headers, "content-type": "application/json"}.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Stub.arrivals = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_retry_honours_retry_after(stub: str) -> None:
    Stub.script = [(429, {"retry-after": "1"}), (429, {"retry-after": "1"})]
    with MoneClient(stub, retry=RetryPolicy(retries=3, backoff=0.01)) as client:
        result = client.classify(picture(), capacity=0.5)
    assert result.label == "shirt"
    assert len(Stub.arrivals) == 3
    gaps = np.diff(Stub.arrivals)
    assert (gaps >= 0.95).all(), gaps  # waited what Retry-After asked, not the 10 ms back-off


def test_async_client_retries_too(stub: str) -> None:
    Stub.script = [(503, {"retry-after": "1"})]

    async def go() -> str:
        async with AsyncMoneClient(stub, retry=RetryPolicy(retries=2, backoff=0.01)) as client:
            return (await client.classify(picture(), capacity=0.5)).label

    assert asyncio.run(go()) == "shirt"
    assert len(Stub.arrivals) == 2
    assert Stub.arrivals[1] - Stub.arrivals[0] >= 0.95


def test_timeout_is_not_retried(stub: str) -> None:
    Stub.script = [(200, {"x-stall": "1"})]
    with MoneClient(stub, timeout=0.2, retry=RetryPolicy(retries=3)) as client, pytest.raises(Timeout):
        client.classify(picture())
    assert len(Stub.arrivals) == 1


def test_retry_gives_up_with_typed_error(stub: str) -> None:
    Stub.script = [(503, {}), (503, {}), (429, {"retry-after": "0"})]
    with (
        MoneClient(stub, retry=RetryPolicy(retries=1, backoff=0.01)) as client,
        pytest.raises(NotReady) as info,
    ):
        client.classify(picture())
    assert info.value.status == 503
    assert len(Stub.arrivals) == 2
    Stub.script = [(429, {"retry-after": "0"})]
    with MoneClient(stub, retry=RetryPolicy(retries=0)) as client, pytest.raises(Overloaded) as over:
        client.classify(picture())
    assert over.value.code == "overloaded"
    assert over.value.message == "queue full"
    assert over.value.retry_after == 0


def test_connection_refused_is_a_transport_error() -> None:
    policy = RetryPolicy(retries=1, backoff=0.01)
    with MoneClient("http://127.0.0.1:9", retry=policy) as client, pytest.raises(TransportError):
        client.health()


def test_error_mapping_native_and_oip() -> None:
    native = httpx.Response(
        422,
        json={"error": {"code": "invalid_budget", "message": "below the floor", "detail": {"floor": 0.02}}},
    )
    exc = from_response(native)
    assert isinstance(exc, BadRequest)
    assert (exc.status, exc.code, exc.message, exc.detail) == (
        422,
        "invalid_budget",
        "below the floor",
        {"floor": 0.02},
    )
    oip = from_response(httpx.Response(400, json={"error": "not base64", "code": "bad_input"}))
    assert (oip.code, oip.message) == ("bad_input", "not base64")
    plain = from_response(httpx.Response(502, text="bad gateway"))
    assert plain.status == 502
    assert "bad gateway" in plain.message


def test_at_most_one_budget() -> None:
    with MoneClient("http://127.0.0.1:9") as client, pytest.raises(ValueError, match="at most one budget"):
        client.classify(picture(), capacity=0.5, gflops=0.1)


def test_any_budget_kind_the_server_lists(stub: str) -> None:
    with MoneClient(stub) as client:
        client._budget_kinds = [BudgetKindInfo(name="capacity"), BudgetKindInfo(name="joules", unit="J")]
        assert client.classify(picture(), budget={"joules": 2.0}).label == "shirt"
        with pytest.raises(
            ValueError, match="unknown budget kind 'watts': the server takes capacity, joules"
        ):
            client.classify(picture(), budget={"watts": 2.0})
        with pytest.raises(ValueError, match="at most one budget, got capacity, joules"):
            client.classify(picture(), capacity=0.5, budget={"joules": 2.0})
    listed = ModelInfo.model_construct(
        budgets={"kinds": [{"name": "joules", "unit": "J", "description": "d"}]}
    )
    assert [(k.name, k.unit) for k in budget_kinds(listed)] == [("joules", "J")]
    older = ModelInfo.model_construct(budgets={"min_capacity": 0.125})
    assert [k.name for k in budget_kinds(older)] == list(NAMED_BUDGETS)


def test_cli_budget_kind_value() -> None:
    parser = build_parser()
    assert parser.parse_args(["classify", "a.png", "--budget", "latency_ms=50"]).budget == (
        "latency_ms",
        50.0,
    )
    for wrong in (
        ["--budget", "latency_ms"],
        ["--budget", "=5"],
        ["--budget", "x=y"],
        ["--gflops", "1", "--budget", "x=1"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["classify", "a.png", *wrong])
    assert parse_mix("joules=3:2,default", kinds=["joules"]) == [
        Budget("joules", 3.0, 2.0),
        Budget(None, None),
    ]
    assert Budget("joules", 3.0).option() == {"joules": 3.0}
    assert Budget(None, None).option() is None
    with pytest.raises(ValueError, match="bad mix entry"):
        parse_mix("joules=3")


def test_payloads() -> None:
    img = to_payload(picture())
    assert (img.content_type, img.kind) == ("image/png", "image")
    assert Image.open(io.BytesIO(img.data)).size == (28, 28)
    rgb = to_payload(np.zeros((20, 30, 3), dtype=np.float32))
    assert Image.open(io.BytesIO(rgb.data)).mode == "RGB"
    assert to_payload(Image.fromarray(picture())).content_type == "image/png"
    clip = to_payload(clip_frames(5, size=27))  # odd side: padded for yuv420p
    assert (clip.content_type, clip.kind, sniff(clip.data)) == ("video/mp4", "clip", "video/mp4")
    assert to_payload(img.data).content_type == "image/png"
    assert [is_clip(np.zeros(s)) for s in [(4, 8, 8), (8, 8, 3), (2, 8, 8, 3), (8, 8)]] == [
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(TypeError):
        to_payload(3.0)  # type: ignore[arg-type]


def test_render_routing_per_frame() -> None:
    frames = [np.full((28, 28), v, dtype=np.uint8) for v in (0, 255)]
    routing = [[[0, 1], [2, 3]], [[3, 3], [0, 0]]]
    img = render(frames, routing, size=64)
    assert img.size == (2 * 64 + 4, 64 + 4 + 24)
    a = np.asarray(img)
    assert not np.array_equal(a[5, 5], a[5, 40])  # different experts, different shade


def test_parse_mix_and_report() -> None:
    mix = parse_mix("capacity=1.0:0.5,latency_ms=50:0.25,default")
    assert mix == [Budget("capacity", 1.0, 0.5), Budget("latency_ms", 50.0, 0.25), Budget(None, None, 1.0)]
    with pytest.raises(ValueError, match="bad mix entry"):
        parse_mix("speed=3")
    report = Report(
        "closed", 2.0, 2.0, [Sample("c", 0.01, 200, 0.05, 0.1, 0.5, True), Sample("c", 0.02, 429)]
    )
    d = report.to_dict()
    assert (d["ok"], d["errors"], d["deadline_hit_rate"], d["throughput_rps"]) == (1, {"429": 1}, 1.0, 0.5)
    assert d["compute_saved"] == pytest.approx(0.5)


def test_client_imports_neither_torch_nor_fastapi() -> None:
    code = "import sys, clients, clients.cli; print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
