"""NVIDIA's `tritonclient` (PyPI), unmodified, against a real `python -m mone.server` process: JSON and binary
tensor data over HTTP, and the gRPC API; FP32 and BYTES inputs, each budget; the answers must equal the
native API's."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from mone.model import MoNEConfig
from mone.model.preprocess import pil_to_tensor
from mone.server.http.proto import inference_pb2 as pb
from mone.server.http.proto import inference_pb2_grpc
from tests.live_server import free_port, start_server, stop_server
from tests.support.media import encode_clip, fashion_images, png
from tests.support.models import LABELS

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow
BUDGETS = [{"capacity": 0.5}, {"gflops": 0.05}, {"latency_ms": 200.0}]


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log") / "stderr.log"


@pytest.fixture(scope="module")
def server(checkpoint_dir: Path, grpc_port: int, server_log: Path) -> Iterator[str]:
    with server_log.open("wb") as stderr:
        # At info level uvicorn would write its own access log; the server's replaces it.
        args = ("--grpc-port", str(grpc_port), "--log-level", "info")
        proc, base = start_server(checkpoint_dir, *args, stderr=stderr)
        yield base
        stop_server(proc)


@pytest.fixture(scope="module")
def triton_grpc(server: str, grpc_port: int) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton(server: str) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def native(base: str, image: bytes, **budget: float) -> dict[str, Any]:
    """/v1/classify with every class's probability."""
    params = {k: str(v) for k, v in budget.items()}
    r = httpx.post(base + "/v1/classify", params={**params, "top_k": "10"}, content=image, timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def probs(native_body: dict[str, Any]) -> np.ndarray:
    out = np.zeros(len(native_body["top_k"]))
    for p in native_body["top_k"]:
        out[p["index"]] = p["prob"]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.tensor(logits, dtype=torch.float64).softmax(-1).numpy()


def pixels(arr: np.ndarray) -> np.ndarray:
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=10)
    return pil_to_tensor(Image.fromarray(arr), cfg).unsqueeze(0).numpy().astype(np.float32)


def assert_same_as_native(base: str, result: Any, image: bytes, budget: dict[str, float]) -> None:
    """The tritonclient result matches /v1/classify at the capacity the request was served at."""
    served = result.get_response()["parameters"]
    assert served["budget_type"] == next(iter(budget))
    # A latency budget is planned from the load of the moment: compare at the capacity it got.
    want = native(base, image, **(budget if "latency_ms" not in budget else {"capacity": served["capacity"]}))
    logits = result.as_numpy("logits")
    assert logits.shape == (1, 10)
    np.testing.assert_allclose(softmax(logits[0]), probs(want), rtol=1e-4, atol=1e-5)
    label = result.as_numpy("label")[0]
    assert (label.decode() if isinstance(label, bytes) else label) == want["top_k"][0]["label"]
    assert result.as_numpy("capacity")[0] == pytest.approx(want["served"]["realised_capacity"], rel=1e-6)
    assert result.as_numpy("gflops")[0] == pytest.approx(want["served"]["gflops"], rel=1e-6)
    if "gflops" in budget:
        assert served["gflops"] <= budget["gflops"]


def test_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("mone")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    names = {t["name"] for t in triton.get_model_metadata("mone")["inputs"]}
    assert names == {"input", "pixels"}


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: next(iter(b)))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_input(server: str, triton: Any, budget: dict[str, float], binary: bool) -> None:
    image = png(fashion_images(3)[2])
    # JSON carries BYTES elements as strings: an encoded image goes base64; binary data carries it raw.
    element: Any = image if binary else base64.b64encode(image).decode()
    tensor = httpclient.InferInput("input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([element], dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label")]
    outputs += [httpclient.InferRequestedOutput(n, binary_data=not binary) for n in ("capacity", "gflops")]
    result = triton.infer("mone", [tensor], outputs=outputs, parameters=budget)
    assert_same_as_native(server, result, image, budget)


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: next(iter(b)))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_input(server: str, triton: Any, budget: dict[str, float], binary: bool) -> None:
    arr = fashion_images(4)[3]
    tensor = httpclient.InferInput("pixels", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(pixels(arr), binary_data=binary)
    # No outputs named: tritonclient then asks for every output as binary data (`binary_data_output`).
    result = triton.infer("mone", [tensor], parameters=budget, request_id="fp32-1")
    assert result.get_response()["id"] == "fp32-1"
    assert_same_as_native(server, result, png(arr), budget)


def test_a_batch_of_images_in_one_binary_tensor(server: str, triton: Any) -> None:
    arrays = fashion_images(5)
    images = [png(a) for a in arrays]
    tensor = httpclient.InferInput("input", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = triton.infer("mone", [tensor], parameters={"capacity": 0.25})
    labels = [x.decode() for x in result.as_numpy("label")]
    logits = result.as_numpy("logits")
    assert logits.shape == (5, 10)
    for i, image in enumerate(images):
        want = native(server, image, capacity=0.25)
        np.testing.assert_allclose(softmax(logits[i]), probs(want), rtol=1e-4, atol=1e-5)
        assert labels[i] == want["top_k"][0]["label"]
        assert labels[i] in LABELS


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_clip_as_binary_bytes(server: str, triton: Any, triton_grpc: Any, transport: str) -> None:
    """An MP4 travels raw in a BYTES tensor, as an image does, and is served as a clip."""
    clip = encode_clip(fashion_images(12))
    mod, client = (httpclient, triton) if transport == "http" else (grpcclient, triton_grpc)
    tensor = mod.InferInput("input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([clip], dtype=np.object_))
    result = client.infer("mone", [tensor], parameters={"capacity": 0.5})
    want = native(server, clip, capacity=0.5)
    assert want["kind"] == "clip"
    np.testing.assert_allclose(softmax(result.as_numpy("logits")[0]), probs(want), rtol=1e-4, atol=1e-5)
    assert result.as_numpy("gflops")[0] == pytest.approx(want["served"]["gflops"], rel=1e-6)


def test_errors_reach_the_client_as_messages(triton: Any) -> None:
    from tritonclient.utils import InferenceServerException

    tensor = httpclient.InferInput("input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as bad:
        triton.infer("mone", [tensor])
    assert bad.value.status() == "415"
    tensor.set_data_from_numpy(np.array([png(fashion_images(1)[0])], dtype=np.object_))
    with pytest.raises(InferenceServerException) as floor:
        triton.infer("mone", [tensor], parameters={"gflops": 1e-6})
    assert bad.value.message()
    assert "floor" in (floor.value.message() or "")


# -- gRPC ----------------------------------------------------------------------------------------------------
def test_grpc_health_and_metadata(triton_grpc: Any) -> None:
    assert triton_grpc.is_server_live()
    assert triton_grpc.is_server_ready()
    assert triton_grpc.is_model_ready("mone")
    meta = triton_grpc.get_server_metadata(as_json=True)
    assert meta["name"] == "mone-serve"
    assert "binary_tensor_data" in meta["extensions"]
    model = triton_grpc.get_model_metadata("mone", as_json=True)
    assert {t["name"] for t in model["inputs"]} == {"input", "pixels"}
    assert {t["name"] for t in model["outputs"]} == {"logits", "label", "capacity", "gflops"}


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: next(iter(b)))
@pytest.mark.parametrize("datatype", ["BYTES", "FP32"])
def test_grpc_infer(server: str, triton_grpc: Any, budget: dict[str, float], datatype: str) -> None:
    arr = fashion_images(5)[4]
    image = png(arr)
    if datatype == "BYTES":
        tensor = grpcclient.InferInput("input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    else:
        tensor = grpcclient.InferInput("pixels", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(pixels(arr))
    result = triton_grpc.infer("mone", [tensor], parameters=budget, request_id="g-1")
    assert result.get_response().id == "g-1"
    assert_same_as_native(server, GrpcResult(result), image, budget)


class GrpcResult:
    """tritonclient.grpc's result seen through the accessors `assert_same_as_native` uses."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def get_response(self) -> dict[str, Any]:
        response: dict[str, Any] = self.result.get_response(as_json=True)
        params = response.get("parameters", {})
        response["parameters"] = {k: next(iter(v.values())) for k, v in params.items()}
        return response

    def as_numpy(self, name: str) -> Any:
        return self.result.as_numpy(name)


def test_grpc_typed_contents_request_id_and_errors(server: str, grpc_port: int) -> None:
    """The typed `contents` form (what some clients send instead of raw bytes), with the project's stubs."""
    import grpc

    image = png(fashion_images(1)[0])
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="mone")
        request.parameters["capacity"].double_param = 0.5
        request.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
        request.outputs.add(name="label")
        answer, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "typed-1")])
        assert dict(call.trailing_metadata())["x-request-id"] == "typed-1"
        assert [o.name for o in answer.outputs] == ["label"]
        label = answer.raw_output_contents[0][4:].decode()
        assert label == native(server, image, capacity=0.5)["top_k"][0]["label"]
        assert answer.parameters["capacity"].double_param == 0.5

        bad = pb.ModelInferRequest(model_name="mone")
        bad.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"nope")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(bad, metadata=[("x-request-id", "typed-2")])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailing = dict(refused.value.trailing_metadata())
        assert trailing["x-request-id"] == "typed-2"
        assert trailing["mone-error-code"] == "unsupported_media_type"

        floor = pb.ModelInferRequest(model_name="mone")
        floor.parameters["gflops"].double_param = 1e-6
        floor.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
        with pytest.raises(grpc.RpcError) as low:
            stub.ModelInfer(floor)
        assert low.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "floor" in (low.value.details() or "")
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelReady(pb.ModelReadyRequest(name="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(dict(missing.value.trailing_metadata())["x-request-id"]) == 32

    metrics = httpx.get(server + "/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in metrics


def test_request_ids_reach_the_access_log(
    server: str, triton: Any, triton_grpc: Any, server_log: Path
) -> None:
    """The ids tritonclient sends (HTTP header, gRPC metadata) are the access log's, one JSON line each."""
    image = np.array([png(fashion_images(1)[0])], dtype=np.object_)
    x = httpclient.InferInput("input", [1], "BYTES")
    x.set_data_from_numpy(image)
    triton.infer("mone", [x], parameters={"capacity": 0.25}, headers={"X-Request-ID": "tc-http-1"})
    g = grpcclient.InferInput("input", [1], "BYTES")
    g.set_data_from_numpy(image)
    triton_grpc.infer("mone", [g], parameters={"capacity": 0.25}, headers={"x-request-id": "tc-grpc-1"})
    deadline = time.monotonic() + 5
    lines: dict[str, dict[str, Any]] = {}
    while len(lines) < 2 and time.monotonic() < deadline:
        for raw in server_log.read_text().splitlines():
            if raw.startswith("{") and ('"tc-http-1"' in raw or '"tc-grpc-1"' in raw):
                entry = json.loads(raw)
                lines[entry["id"]] = entry
        time.sleep(0.05)
    http, rpc = lines["tc-http-1"], lines["tc-grpc-1"]
    assert (http["method"], http["path"], http["status"]) == ("POST", "/v2/models/mone/infer", 200)
    assert (rpc["method"], rpc["path"], rpc["status"]) == (
        "GRPC",
        "/inference.GRPCInferenceService/ModelInfer",
        200,
    )
    for entry in (http, rpc):
        assert (entry["kind"], entry["budget"], entry["budget_value"], entry["capacity"]) == (
            "image",
            "capacity",
            0.25,
            0.25,
        )
        assert entry["gflops"] > 0
        assert entry["compute_ms"] > 0
    # The access log replaces uvicorn's: no plain-text line for the same request.
    assert '"POST /v2/models/mone/infer HTTP/1.1"' not in server_log.read_text()
