"""Bad input at the HTTP surface is a 422 with a message, and every budget kind works with the model's own
lowest capacity (1/2**(E-1) for E experts), not a hard-coded 1/8."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from mone.model import MoNE, MoNEConfig, expert_counts, gflops, realised_capacity, save_checkpoint
from mone.server.core.engine import fit_settings
from mone.server.http.app import create_app
from tests.support.media import fashion_images, png
from tests.support.models import LABELS, fast_settings

pytestmark = pytest.mark.anyio


def _error(r: httpx.Response, code: str, says: str) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    error = body["error"] if isinstance(body["error"], dict) else body
    message = str(error["message"] if isinstance(body["error"], dict) else body["error"])
    assert error["code"] == code, body
    assert says in message, message
    return message


def _fp32(shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32", "data": data}]}


def _raw_fp32(shape: list[int], values: str) -> bytes:
    """An OIP body written by hand: JSON has no NaN, but Python's parser takes the literal."""
    tensor = f'{{"name": "pixels", "shape": {shape}, "datatype": "FP32", "data": [{values}]}}'
    return f'{{"inputs": [{tensor}]}}'.encode()


# -- the Mi/4 of the other server tests (4 experts) --------------------------------------------------------
async def test_native_budget_that_is_not_a_number_is_a_422(client: httpx.AsyncClient) -> None:
    image = png(fashion_images(1)[0])
    for value in ("true", "0.5.5", "abc"):
        r = await client.post("/v1/classify", files={"file": image}, data={"capacity": value})
        _error(r, "validation_error", "invalid request parameters")
    for value in ("nan", "inf"):
        r = await client.post("/v1/classify", files={"file": image}, data={"capacity": value})
        _error(r, "invalid_budget", "must be a finite number")
    r = await client.post("/v1/classify", files={"file": image}, data={"capacity": "0.05"})
    _error(r, "invalid_budget", "outside [0.125, 1]")


@pytest.mark.parametrize(
    ("params", "code", "says"),
    [
        ({"capacity": True}, "validation_error", "parameter capacity must be a number"),
        ({"capacity": "0.5.5"}, "validation_error", "parameter capacity must be a number"),
        ({"capacity": [0.5]}, "validation_error", "request does not match the schema"),
        ({"capacity": 0.05}, "invalid_budget", "outside [0.125, 1]"),
        ({"gflops": True}, "validation_error", "parameter gflops must be a number"),
    ],
)
async def test_oip_budget_that_is_not_a_number_is_a_422(
    client: httpx.AsyncClient, params: dict[str, Any], code: str, says: str
) -> None:
    body = {**_fp32([1, 1, 28, 28], [0.0] * 784), "parameters": params}
    _error(await client.post("/v2/models/mone/infer", json=body), code, says)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_raw_fp32([1, 1, 28, 28], ", ".join(["0.0"] * 783 + ["NaN"])), "NaN or infinity"),
        (_raw_fp32([1, 1, 28, 28], ", ".join(["Infinity"] + ["0.0"] * 783)), "NaN or infinity"),
        (_raw_fp32([1, 2, 1, 28, 28], ", ".join(["0.0"] * 1567 + ["-Infinity"])), "NaN or infinity"),
        (_raw_fp32([0, 1, 28, 28], ""), "an empty batch"),
        (_raw_fp32([0, 2, 1, 28, 28], ""), "an empty batch"),
        (_raw_fp32([2, 0, 1, 28, 28], ""), "zero frames"),
        (b'{"inputs": [{"name": "input", "shape": [0], "datatype": "BYTES", "data": []}]}', "no samples"),
        (b'{"inputs": []}', "request does not match the schema"),
    ],
    ids=[
        "nan",
        "inf",
        "clip-minus-inf",
        "empty-batch",
        "empty-clip-batch",
        "zero-frames",
        "bytes-empty",
        "none",
    ],
)
async def test_oip_bad_tensor_is_a_422(client: httpx.AsyncClient, body: bytes, says: str) -> None:
    r = await client.post("/v2/models/mone/infer", content=body, headers={"content-type": "application/json"})
    _error(r, "validation_error", says)
    # The server is unharmed: a good tensor right after is served.
    good = await client.post("/v2/models/mone/infer", json=_fp32([1, 1, 28, 28], [0.0] * 784))
    assert good.status_code == 200, good.text


# -- models with 2 and 5 experts: lowest capacity 1/2 and 1/16 ---------------------------------------------
def _model(num_experts: int) -> MoNE:
    torch.manual_seed(num_experts)
    net = MoNE(MoNEConfig.from_variant("Mi/4", num_classes=10, num_experts=num_experts))
    torch.nn.init.normal_(net.head.weight, std=0.5)
    return net.eval()


@pytest.fixture(scope="module", params=[2, 5], ids=["E2", "E5"])
async def experts_app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FastAPI, MoNEConfig]]:
    E = request.param
    path = tmp_path_factory.mktemp(f"experts{E}")
    net = _model(E)
    save_checkpoint(path, net, labels=LABELS)
    # The test settings calibrate at 0.125 and degrade down to 0.25: below the floor of a 2-expert model.
    settings = fast_settings(path, overload_policy="degrade", degrade_floor=0.125)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application, net.cfg


@pytest.fixture(scope="module")
async def experts_client(
    experts_app: tuple[FastAPI, MoNEConfig],
) -> AsyncIterator[tuple[httpx.AsyncClient, MoNEConfig]]:
    transport = httpx.ASGITransport(app=experts_app[0])
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        yield c, experts_app[1]


async def test_metadata_reports_the_models_own_floor(
    experts_client: tuple[httpx.AsyncClient, MoNEConfig],
) -> None:
    client, cfg = experts_client
    lo = 1 / 2 ** (cfg.num_experts - 1)
    m = (await client.get("/v1/models/mone")).json()
    assert m["budgets"]["min_capacity"] == pytest.approx(lo)
    assert m["budgets"]["floor_gflops"]["image"] == pytest.approx(gflops(cfg, lo, 1))
    capacities = [row["capacity"] for row in m["profile"]]
    assert capacities[0] == pytest.approx(lo)
    assert min(capacities) >= lo - 1e-12
    oip = (await client.get("/v2/models/mone")).json()
    assert oip["parameters"]["min_capacity"] == pytest.approx(lo)


async def test_every_budget_kind_with_the_models_floor(
    experts_client: tuple[httpx.AsyncClient, MoNEConfig],
) -> None:
    client, cfg = experts_client
    E, lo = cfg.num_experts, 1 / 2 ** (cfg.num_experts - 1)
    image = png(fashion_images(1)[0])
    floor_gflops = gflops(cfg, lo, 1)
    floor_realised = realised_capacity(expert_counts(lo, cfg.num_tokens, E))

    async def classify(**fields: str) -> httpx.Response:
        return await client.post("/v1/classify", files={"file": image}, data=fields)

    # capacity: the floor itself is served; half of it is a 422 naming the model's range.
    r = await classify(capacity=str(lo))
    assert r.status_code == 200, r.text
    assert r.json()["served"]["realised_capacity"] == pytest.approx(floor_realised)
    assert len(r.json()["served"]["expert_counts"]) == E
    _error(await classify(capacity=str(lo / 2)), "invalid_budget", f"outside [{lo:g}, 1]")
    # gflops: the floor's GFLOPs are served at the floor; less is a 422 naming the floor.
    r = await classify(gflops=str(floor_gflops))
    assert r.status_code == 200, r.text
    assert r.json()["served"]["gflops"] == pytest.approx(floor_gflops)
    _error(await classify(gflops=str(floor_gflops / 2)), "invalid_budget", "below the model's floor")
    # latency_ms: an impossible budget is served (at the floor, or at a capacity measured no slower), never
    # below the floor, and counted missed.
    r = await classify(latency_ms="0.001")
    assert r.status_code == 200, r.text
    assert r.json()["served"]["realised_capacity"] >= floor_realised - 1e-9
    assert len(r.json()["served"]["expert_counts"]) == E
    assert r.json()["served"]["deadline_met"] is False
    # default: the server's default capacity.
    r = await classify()
    assert r.status_code == 200, r.text
    assert r.json()["served"]["realised_capacity"] == pytest.approx(1.0)
    # The same through the Open Inference Protocol.
    body = _fp32([1, 1, 28, 28], [0.0] * 784)
    r = await client.post("/v2/models/mone/infer", json={**body, "parameters": {"capacity": lo}})
    assert r.status_code == 200, r.text
    too_low = {**body, "parameters": {"capacity": lo / 2}}
    _error(await client.post("/v2/models/mone/infer", json=too_low), "invalid_budget", f"outside [{lo:g}, 1]")
    r = await client.post("/v2/models/mone/infer", json={**body, "parameters": {"gflops": floor_gflops / 2}})
    _error(r, "invalid_budget", "below the model's floor")


async def test_degrading_and_calibration_stay_at_or_above_the_floor(
    experts_app: tuple[FastAPI, MoNEConfig],
) -> None:
    app, cfg = experts_app
    engine = app.state.engine
    lo = cfg.min_capacity
    assert engine.settings.degrade_floor == pytest.approx(max(0.125, lo))
    assert min(engine.settings.calibration_capacities) == pytest.approx(max(0.125, lo))
    full = engine.scheduler.degrade_cap(engine.settings.max_queue_size)
    assert full == pytest.approx(max(0.125, lo))


def test_a_default_capacity_below_the_models_floor_is_refused(tmp_path: Path) -> None:
    cfg = MoNEConfig.from_variant("Mi/4", num_classes=10, num_experts=2)
    settings = fast_settings(tmp_path, default_capacity=0.25, degrade_floor=0.25)
    with pytest.raises(ValueError, match=r"default_capacity 0.25 is below the model's lowest capacity 0.5"):
        fit_settings(settings, cfg)
    # Unchanged when nothing is below the floor.
    fine = fast_settings(tmp_path, calibration_capacities=[0.5, 1.0], degrade_floor=0.5)
    assert fit_settings(fine, cfg) is fine
