"""The gRPC listener's life with the app's, and what it refuses (in process, grpc.aio on the app's loop)."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from mone.server.http.app import create_app
from mone.server.http.proto import inference_pb2 as pb
from mone.server.http.proto import inference_pb2_grpc
from tests.live_server import free_port
from tests.support.media import fashion_images, png
from tests.support.models import fast_settings

pytestmark = pytest.mark.anyio
KEY = "a-long-enough-key"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_grpc_starts_and_stops_with_the_app(checkpoint_dir: Path) -> None:
    port = free_port()
    app = create_app(fast_settings(checkpoint_dir, grpc_port=port, api_key=KEY))
    assert not port_open(port)
    async with app.router.lifespan_context(app):
        assert port_open(port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
            # The model's routes need the key, as over HTTP; health and server metadata do not.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelReady(pb.ModelReadyRequest(name="mone"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            auth = [("authorization", f"Bearer {KEY}")]
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="mone"), metadata=auth)).ready

            request = pb.ModelInferRequest(model_name="mone")
            request.parameters["capacity"].double_param = 1.0
            x = request.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 28, 28])
            x.contents.fp32_contents.extend([0.5] * 784)
            image = request.inputs.add(name="input", datatype="BYTES", shape=[1])
            image.contents.bytes_contents.append(png(fashion_images(1)[0]))
            image.parameters["capacity"].double_param = 0.25
            answer = await stub.ModelInfer(request, metadata=auth)
            outputs = {
                o.name: (o, raw) for o, raw in zip(answer.outputs, answer.raw_output_contents, strict=True)
            }
            assert list(outputs["logits"][0].shape) == [2, 10]
            capacities = outputs["capacity"][1]
            assert len(capacities) == 8
            served = np.frombuffer(capacities, "<f4")
            assert served[0] == 1.0
            assert served[1] < 0.3

            for shape, count, words in [([1, 1, 28, 28], 10, "elements for shape"), ([2], 1, "elements")]:
                bad = pb.ModelInferRequest(model_name="mone")
                t = bad.inputs.add(name="pixels" if len(shape) == 4 else "input", shape=shape)
                t.datatype = "FP32" if len(shape) == 4 else "BYTES"
                if t.datatype == "FP32":
                    t.contents.fp32_contents.extend([0.0] * count)
                else:
                    t.contents.bytes_contents.append(b"x")
                with pytest.raises(grpc.aio.AioRpcError) as invalid:
                    await stub.ModelInfer(bad, metadata=auth)
                assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert words in (invalid.value.details() or "")
    assert not port_open(port)


def test_grpc_port_must_not_clash(checkpoint_dir: Path) -> None:
    with pytest.raises(ValidationError, match="grpc_port"):
        fast_settings(checkpoint_dir, grpc_port=9000, port=9000)


async def test_a_taken_grpc_port_fails_the_start(checkpoint_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(fast_settings(checkpoint_dir, grpc_port=port))
        with pytest.raises(RuntimeError, match="cannot listen for gRPC"):
            async with app.router.lifespan_context(app):
                pass


async def test_a_call_past_its_deadline_is_cancelled_in_the_engine(checkpoint_dir: Path) -> None:
    """A batch that waits 1 s for company outlives a 0.3 s client deadline: the queued sample is dropped.
    Meanwhile a second call is one more than `limit_concurrency` allows, and is refused at once."""
    import asyncio
    import json
    import logging

    port = free_port()
    settings = fast_settings(
        checkpoint_dir, grpc_port=port, max_batch_wait_ms=1000.0, batch_wait="always", limit_concurrency=1
    )
    app = create_app(settings)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("mone.access").addHandler(keep)
    try:
        async with app.router.lifespan_context(app):
            engine = app.state.engine
            before = engine.stats.cancelled
            request = pb.ModelInferRequest(model_name="mone")
            image = request.inputs.add(name="input", datatype="BYTES", shape=[1])
            image.contents.bytes_contents.append(png(fashion_images(1)[0]))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                first = asyncio.ensure_future(
                    stub.ModelInfer(request, timeout=0.3, metadata=[("x-request-id", "late-1")])
                )
                await asyncio.sleep(0.1)
                with pytest.raises(grpc.aio.AioRpcError) as busy:
                    await stub.ModelInfer(request, timeout=5)
                assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await first
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if engine.stats.cancelled > before:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats.cancelled == before + 1
            assert engine.stats.inflight == 0
    finally:
        logging.getLogger("mone.access").removeHandler(keep)
    (line,) = [json.loads(x) for x in lines if '"late-1"' in x]
    assert (line["status"], line["error"]) == (499, "cancelled")
