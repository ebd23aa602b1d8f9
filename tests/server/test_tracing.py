"""OpenTelemetry spans of a request, read back with the SDK's in-memory exporter."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI

from mone.server.http.app import create_app
from mone.server.http.proto import inference_pb2 as pb
from mone.server.http.proto import inference_pb2_grpc
from tests.live_server import free_port
from tests.support.media import fashion_images, png
from tests.support.models import fast_settings

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

pytestmark = pytest.mark.anyio
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
async def traced_app(
    checkpoint_dir: Path, exporter: InMemorySpanExporter, grpc_port: int
) -> AsyncIterator[FastAPI]:
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(fast_settings(checkpoint_dir, grpc_port=grpc_port), tracer_provider=provider)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture(scope="module")
async def traced(traced_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=traced_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c


def spans_of(exporter: InMemorySpanExporter, request_id: str) -> dict[str, list[Any]]:
    """The spans of one request's trace, by name."""
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.attributes.get("mone.request_id") == request_id]
    out: dict[str, list[Any]] = {}
    for s in spans:
        if s.context.trace_id == root.context.trace_id:
            out.setdefault(s.name if s is not root else "root", []).append(s)
    return out


def children(parent: Any, spans: list[Any]) -> list[Any]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_classify_is_traced_under_the_callers_trace(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    headers = {"traceparent": TRACEPARENT, "x-request-id": "t-1"}
    r = await traced.post("/v1/classify?capacity=0.5", content=png(fashion_images(1)[0]), headers=headers)
    assert r.status_code == 200, r.text
    spans = spans_of(exporter, "t-1")
    (root,) = spans["root"]
    assert root.name == "POST /v1/classify"
    assert root.kind == SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert root.attributes["mone.budget.type"] == "capacity"
    assert root.attributes["mone.budget.value"] == 0.5
    assert root.attributes["mone.capacity"] == r.json()["served"]["capacity"]
    assert root.attributes["mone.gflops"] == pytest.approx(r.json()["served"]["gflops"])
    assert root.attributes["http.response.status_code"] == 200
    (decode,), (queue,), (batch,), (forward,) = (
        spans["decode"],
        spans["queue"],
        spans["batch"],
        spans["forward"],
    )
    assert {s.name for s in children(root, sum(spans.values(), []))} == {"decode", "queue", "batch"}
    assert children(batch, [forward]) == [forward]
    assert batch.attributes["mone.batch.size"] == r.json()["batch_size"]
    assert batch.attributes["mone.capacity"] == 0.5
    # One time line: decode, then waiting, then the batch around its forward, all inside the request.
    assert root.start_time <= decode.start_time <= decode.end_time <= queue.start_time
    assert queue.end_time == batch.start_time <= forward.start_time <= forward.end_time <= batch.end_time
    assert batch.end_time <= root.end_time
    assert forward.end_time - forward.start_time >= r.json()["timing"]["compute_ms"] * 1e6 * 0.9


async def test_each_sample_of_an_oip_request_has_its_spans(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    data = [base64.b64encode(png(a)).decode() for a in fashion_images(2)]
    body = {
        "inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": data}],
        "parameters": {"latency_ms": 500},
    }
    r = await traced.post("/v2/models/mone/infer", json=body, headers={"x-request-id": "t-2"})
    assert r.status_code == 200, r.text
    spans = spans_of(exporter, "t-2")
    assert spans["root"][0].name == "POST /v2/models/{name}/infer"
    assert spans["root"][0].attributes["mone.budget.type"] == "latency_ms"
    assert spans["root"][0].attributes["mone.samples"] == 2
    assert sorted(s.attributes["mone.sample"] for s in spans["queue"]) == [0, 1]
    assert len(spans["batch"]) == len(spans["forward"]) == 2


async def test_an_error_is_one_span_with_its_code(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    r = await traced.post("/v1/classify", content=b"not an image", headers={"x-request-id": "t-3"})
    assert r.status_code == 415
    spans = spans_of(exporter, "t-3")
    assert set(spans) == {"root"}
    assert spans["root"][0].attributes["error.type"] == "unsupported_media_type"


async def test_a_grpc_call_is_traced(
    traced_app: FastAPI, exporter: InMemorySpanExporter, grpc_port: int
) -> None:
    request = pb.ModelInferRequest(model_name="mone")
    request.parameters["gflops"].double_param = 0.05
    request.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        png(fashion_images(1)[0])
    )
    metadata = [("traceparent", TRACEPARENT), ("x-request-id", "t-4")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        await inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata)
    spans = spans_of(exporter, "t-4")
    (root,) = spans["root"]
    assert root.name == "inference.GRPCInferenceService/ModelInfer"
    assert root.attributes["rpc.method"] == "ModelInfer"
    assert root.attributes["mone.budget.type"] == "gflops"
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert {"decode", "queue", "batch", "forward"} <= set(spans)


def test_tracing_is_off_unless_configured(checkpoint_dir: Path) -> None:
    assert create_app(fast_settings(checkpoint_dir)).state.tracing is None
    app = create_app(fast_settings(checkpoint_dir, otel_exporter="console", otel_sample_ratio=0.5))
    assert app.state.tracing is not None
    app.state.tracing.shutdown()
