"""The HTTP surface in-process (httpx + ASGI transport + lifespan): native API, OIP, metrics, errors."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mone.model import expert_counts, gflops
from mone.model.preprocess import pil_to_tensor
from tests.server import oip_schema
from tests.support.media import encode, encode_clip, fashion_images, png
from tests.support.models import LABELS

pytestmark = pytest.mark.anyio


def engine_of(app: FastAPI) -> Any:
    return app.state.engine


def offline_logits(app: FastAPI, arrays: list[np.ndarray], capacity: float) -> torch.Tensor:
    engine = engine_of(app)
    x = torch.stack([pil_to_tensor(Image.fromarray(a), engine.cfg) for a in arrays])
    with torch.inference_mode():
        return engine.runner.model(x, capacity=capacity).logits


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["code"] == code
    return dict(body["error"])


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- health and metadata --------------------------------------------------------------------------------
async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    live = (await client.get("/v2/health/live")).json()
    ready = (await client.get("/v2/health/ready")).json()
    jsonschema.validate(live, oip_schema.LIVE)
    jsonschema.validate(ready, oip_schema.READY)
    assert live["live"]
    assert ready["ready"]
    jsonschema.validate((await client.get("/v2")).json(), oip_schema.SERVER_METADATA)


async def test_model_metadata_has_labels_inputs_and_profile(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()["models"]
    assert [m["name"] for m in models] == ["mone"]
    m = (await client.get("/v1/models/mone")).json()
    assert m["labels"] == LABELS
    assert m["input"]["image"]["size"] == [28, 28]
    assert m["budgets"]["floor_gflops"]["image"] == pytest.approx(gflops(m_cfg(m), 0.125, 1))
    rows = {r["capacity"]: r for r in m["profile"]}
    assert rows[0.5]["accuracy"] == 0.8
    assert rows[1.0]["image"]["gflops"] == pytest.approx(gflops(m_cfg(m), 1.0))
    assert rows[1.0]["image"]["latency_ms_batch1"] > rows[0.125]["image"]["latency_ms_batch1"] > 0
    assert rows[1.0]["clip"]["latency_ms_max_batch"] > rows[1.0]["clip"]["latency_ms_batch1"]
    assert m["latency_model"]["1"]["samples"] > 0
    assert m["latency_model"]["8"]["samples"] > 0
    assert m["evaluation"]["capacities"] == [0.25, 0.5, 1.0]
    assert_error(await client.get("/v1/models/nope"), 404, "not_found")


def m_cfg(meta: dict[str, Any]) -> Any:
    from mone.model import MoNEConfig

    return MoNEConfig.from_dict(meta["config"])


async def test_oip_model_metadata_and_ready(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/models/mone")
    jsonschema.validate(r.json(), oip_schema.MODEL_METADATA)
    assert {t["name"] for t in r.json()["inputs"]} == {"input", "pixels"}
    assert (await client.get("/v2/models/mone/versions/1/ready")).json() == {"name": "mone", "ready": True}
    missing = await client.get("/v2/models/nope")
    assert missing.status_code == 404
    jsonschema.validate(missing.json(), oip_schema.ERROR)


async def test_openapi_lists_the_routes(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/classify", "/v1/models", "/v2/models/{name}/infer", "/healthz"} <= set(paths)


# -- classify ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [0.25, 1.0])
async def test_png_over_http_equals_offline(app: FastAPI, client: httpx.AsyncClient, capacity: float) -> None:
    arrays = fashion_images(8)
    want = offline_logits(app, arrays, capacity).softmax(-1)
    for i, arr in enumerate(arrays):
        r = await client.post(
            "/v1/classify",
            files={"file": ("x.png", png(arr), "image/png")},
            data={"capacity": str(capacity), "top_k": "10"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        got = torch.zeros(10)
        for p in body["top_k"]:
            got[p["index"]] = p["prob"]
            assert p["label"] == LABELS[p["index"]]
        torch.testing.assert_close(got, want[i], rtol=1e-4, atol=1e-5)
        assert body["top_k"][0]["index"] == int(want[i].argmax())


async def test_response_accounts_for_what_was_served(client: httpx.AsyncClient) -> None:
    arr = fashion_images(1)[0]
    r = await client.post(
        "/v1/classify?capacity=0.5&routing=true&top_k=3",
        content=png(arr),
        headers={"content-type": "image/png"},
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["requested"] == {"type": "capacity", "value": 0.5}
    served = body["served"]
    counts = list(expert_counts(0.5, 49, 4))
    assert served["expert_counts"] == counts
    assert served["realised_capacity"] == pytest.approx(
        sum(k * w for k, w in zip(counts, (1 / 8, 1 / 4, 1 / 2, 1), strict=True)) / 49
    )
    assert sum(served["capacity_distribution"]) == pytest.approx(1.0)
    assert served["gflops"] < served["dense_gflops"]
    assert len(body["top_k"]) == 3
    t = body["timing"]
    assert t["total_ms"] >= t["queue_ms"] + t["compute_ms"] - 1e-6
    assert t["decode_ms"] >= 0
    grid = np.array(body["routing"])
    assert grid.shape == (1, 7, 7)
    assert np.bincount(grid.ravel(), minlength=4).tolist() == counts


async def test_clip_upload(client: httpx.AsyncClient) -> None:
    frames = fashion_images(12)
    data = encode_clip(frames)
    r = await client.post(
        "/v1/classify",
        files={"file": ("c.mp4", data, "video/mp4")},
        data={"capacity": "0.5", "routing": "true"},
    )
    body = r.json()
    assert r.status_code == 200, body
    assert (body["kind"], body["frames"]) == ("clip", 8)
    assert np.array(body["routing"]).shape == (8, 7, 7)
    assert body["served"]["gflops"] == pytest.approx(
        body["served"]["dense_gflops"] * 0 + body["served"]["gflops"]
    )
    from mone.model import MoNEConfig

    assert body["served"]["gflops"] == pytest.approx(
        gflops(MoNEConfig.from_variant("Mi/4", num_classes=10), 0.5, 8)
    )


async def test_gflops_budget_over_http(client: httpx.AsyncClient) -> None:
    data = png(fashion_images(1)[0])
    for budget in (0.03, 0.06, 0.1):
        r = await client.post(
            f"/v1/classify?gflops={budget}", content=data, headers={"content-type": "image/png"}
        )
        assert r.status_code == 200
        assert r.json()["served"]["gflops"] <= budget
    err = assert_error(
        await client.post("/v1/classify?gflops=0.001", content=data, headers={"content-type": "image/png"}),
        422,
        "invalid_budget",
    )
    assert "floor" in err["message"]
    assert err["detail"]["floor_gflops"] > 0.001


async def test_latency_budget_over_http(client: httpx.AsyncClient) -> None:
    data = png(fashion_images(1)[0])
    r = await client.post("/v1/classify?latency_ms=5000", content=data, headers={"content-type": "image/png"})
    served = r.json()["served"]
    assert served["planned_ms"] <= 5000
    assert served["deadline_met"] is True
    assert served["realised_capacity"] == 1.0


# -- errors and limits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("capacity=0.05", 422, "invalid_budget"),
        ("capacity=1.5", 422, "invalid_budget"),
        ("capacity=0.5&gflops=1", 422, "invalid_budget"),
        ("capacity=abc", 422, "validation_error"),
        ("top_k=0", 422, "validation_error"),
        ("unknown=1", 422, "validation_error"),
    ],
)
async def test_bad_parameters(client: httpx.AsyncClient, query: str, status: int, code: str) -> None:
    data = png(fashion_images(1)[0])
    assert_error(
        await client.post(f"/v1/classify?{query}", content=data, headers={"content-type": "image/png"}),
        status,
        code,
    )


async def test_bad_payloads(client: httpx.AsyncClient) -> None:
    tiff = encode(Image.new("L", (28, 28)), "TIFF")
    assert_error(await client.post("/v1/classify", content=tiff), 415, "unsupported_media_type")
    assert_error(await client.post("/v1/classify", content=b"\x89PNG\r\n\x1a\nbroken"), 400, "bad_input")
    assert_error(await client.post("/v1/classify", content=b""), 400, "bad_input")
    assert_error(await client.post("/v1/classify", files={"other": ("x", b"1")}), 400, "bad_input")
    assert_error(await client.get("/v1/nothing-here"), 404, "not_found")


# -- Open Inference Protocol ---------------------------------------------------------------------------------
async def oip_infer(client: httpx.AsyncClient, request: dict[str, Any]) -> httpx.Response:
    jsonschema.validate(request, oip_schema.INFERENCE_REQUEST)
    r = await client.post("/v2/models/mone/infer", json=request)
    jsonschema.validate(r.json(), oip_schema.INFERENCE_RESPONSE if r.status_code == 200 else oip_schema.ERROR)
    return r


async def test_oip_bytes_input_equals_offline(app: FastAPI, client: httpx.AsyncClient) -> None:
    arrays = fashion_images(3)
    data = [base64.b64encode(png(a)).decode() for a in arrays]
    req = {
        "id": "r1",
        "parameters": {"capacity": 0.5},
        "inputs": [{"name": "input", "shape": [3], "datatype": "BYTES", "data": data}],
    }
    r = await oip_infer(client, req)
    body = r.json()
    assert r.status_code == 200, body
    assert body["id"] == "r1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["logits"]["shape"] == [3, 10]
    want = offline_logits(app, arrays, 0.5)
    torch.testing.assert_close(torch.tensor(out["logits"]["data"]).view(3, 10), want, rtol=1e-4, atol=1e-4)
    assert out["label"]["data"] == [LABELS[i] for i in want.argmax(-1).tolist()]
    assert body["parameters"]["capacity"] == 0.5


async def test_oip_fp32_input_and_per_input_budget(app: FastAPI, client: httpx.AsyncClient) -> None:
    arrays = fashion_images(2)
    cfg = engine_of(app).cfg
    x = torch.stack([pil_to_tensor(Image.fromarray(a), cfg) for a in arrays])
    req = {
        "parameters": {"capacity": 1.0},
        "inputs": [
            {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x[0].flatten().tolist()},
            {
                "name": "pixels",
                "shape": [1, 1, 28, 28],
                "datatype": "FP32",
                "data": x[1].flatten().tolist(),
                "parameters": {"capacity": 0.25},
            },
        ],
        "outputs": [{"name": "logits"}, {"name": "capacity"}],
    }
    r = await oip_infer(client, req)
    body = r.json()
    assert r.status_code == 200, body
    out = {o["name"]: o for o in body["outputs"]}
    assert set(out) == {"logits", "capacity"}
    assert out["capacity"]["data"][0] == 1.0
    assert out["capacity"]["data"][1] < 0.3
    with torch.inference_mode():
        want = engine_of(app).runner.model(x, capacity=[1.0, 0.25]).logits
    torch.testing.assert_close(torch.tensor(out["logits"]["data"]).view(2, 10), want, rtol=1e-4, atol=1e-4)


async def test_oip_gflops_budget_in_parameters(client: httpx.AsyncClient) -> None:
    data = [base64.b64encode(png(fashion_images(1)[0])).decode()]
    req = {
        "parameters": {"gflops": 0.05},
        "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": data}],
    }
    body = (await oip_infer(client, req)).json()
    assert body["parameters"]["gflops"] <= 0.05
    req["parameters"] = {"gflops": 0.0001}
    r = await oip_infer(client, req)
    assert r.status_code == 422
    assert "floor" in r.json()["error"]


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 10},
        {"name": "pixels", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0.0] * 3 * 784},
        {"name": "input", "shape": [1], "datatype": "BYTES", "data": ["%%%not base64"]},
        {"name": "input", "shape": [1], "datatype": "INT64", "data": [1]},
    ],
)
async def test_oip_bad_inputs_are_4xx(client: httpx.AsyncClient, tensor: dict[str, Any]) -> None:
    r = await oip_infer(client, {"inputs": [tensor]})
    assert r.status_code == 400


# -- metrics -------------------------------------------------------------------------------------------------
async def test_metrics_move(client: httpx.AsyncClient) -> None:
    route = {"route": "/v1/classify", "code": "200"}
    before = {
        "ok": await metric(client, "mone_requests_total", **route),
        "batches": await metric(client, "mone_batch_size_count"),
        "gflops": await metric(client, "mone_gflops_total"),
        "dense": await metric(client, "mone_gflops_dense_total"),
        "image": await metric(client, "mone_request_gflops_count", kind="image"),
        "capacity": await metric(client, "mone_capacity_served_count"),
        "met": await metric(client, "mone_deadline_total", outcome="met"),
        "bad": await metric(client, "mone_rejected_total", reason="bad_input"),
        "queue": await metric(client, "mone_queue_duration_seconds_count"),
        "compute": await metric(client, "mone_compute_duration_seconds_count"),
        "duration": await metric(client, "mone_request_duration_seconds_count", route="/v1/classify"),
    }
    data = png(fashion_images(1)[0])
    await client.post("/v1/classify?capacity=0.5", content=data, headers={"content-type": "image/png"})
    await client.post("/v1/classify?latency_ms=10000", content=data, headers={"content-type": "image/png"})
    await client.post("/v1/classify", content=b"junk")
    after = {
        "ok": await metric(client, "mone_requests_total", **route),
        "batches": await metric(client, "mone_batch_size_count"),
        "gflops": await metric(client, "mone_gflops_total"),
        "dense": await metric(client, "mone_gflops_dense_total"),
        "image": await metric(client, "mone_request_gflops_count", kind="image"),
        "capacity": await metric(client, "mone_capacity_served_count"),
        "met": await metric(client, "mone_deadline_total", outcome="met"),
        "bad": await metric(client, "mone_rejected_total", reason="bad_input"),
        "queue": await metric(client, "mone_queue_duration_seconds_count"),
        "compute": await metric(client, "mone_compute_duration_seconds_count"),
        "duration": await metric(client, "mone_request_duration_seconds_count", route="/v1/classify"),
    }
    assert after["ok"] - before["ok"] == 2
    assert after["image"] - before["image"] == 2
    assert after["capacity"] - before["capacity"] == 2
    assert after["queue"] - before["queue"] == 2
    assert after["batches"] - before["batches"] >= 1
    assert after["compute"] - before["compute"] == after["batches"] - before["batches"]
    assert after["met"] - before["met"] == 1
    assert after["bad"] - before["bad"] == 1
    assert after["duration"] - before["duration"] == 3
    saved = (after["dense"] - before["dense"]) - (after["gflops"] - before["gflops"])
    assert saved > 0
    assert await metric(client, "mone_model_info", model="mone", variant="Mi/4", device="cpu") == 1
    text = (await client.get("/metrics")).text
    for name in ("mone_queue_depth", "mone_inflight_requests", "mone_cancelled_total"):
        assert name in text
    assert "summary" not in text.lower().split("# type")[0]
    for family in text_string_to_metric_families(text):
        assert family.type != "summary"


async def test_oip_clip_and_animated_gif_as_clip(client: httpx.AsyncClient) -> None:
    frames = fashion_images(10)
    mp4 = base64.b64encode(encode_clip(frames)).decode()
    gif_frames = [Image.fromarray(a) for a in frames[:4]]
    gif = base64.b64encode(encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:])).decode()
    req = {
        "parameters": {"capacity": 0.5},
        "inputs": [
            {"name": "input", "shape": [1], "datatype": "BYTES", "data": [mp4]},
            {
                "name": "input",
                "shape": [1],
                "datatype": "BYTES",
                "data": [gif],
                "parameters": {"kind": "clip"},
            },
        ],
    }
    body = (await oip_infer(client, req)).json()
    out = {o["name"]: o for o in body["outputs"]}
    from mone.model import MoNEConfig

    clip_gflops = gflops(MoNEConfig.from_variant("Mi/4", num_classes=10), 0.5, 8)
    assert out["gflops"]["data"] == pytest.approx([clip_gflops, clip_gflops], rel=1e-6)
