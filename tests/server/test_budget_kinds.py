"""The registry of budget kinds: each kind parses, validates and picks a level as the server always has, the
wire rejects unknown and multiple kinds with the same 422s, and /v1/models and the OpenAPI schema list it."""

from __future__ import annotations

import math

import httpx
import pytest

from mone.model import MoNEConfig
from mone.server.config import Settings
from mone.server.core.budget import Budget, Planner, parse_budget
from mone.server.core.budget_kinds import BUDGET_KINDS, DEFAULT, budget_kind
from mone.server.errors import InvalidBudgetError
from mone.server.http.app import create_app
from tests.support.media import fashion_images, png

CFG = MoNEConfig.from_variant("Mi/4", num_classes=10)
LO = CFG.min_capacity


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(CFG)


def parse(**given: float | None) -> Budget:
    return parse_budget(given, 0.75, LO)


def test_the_registry_in_order() -> None:
    assert list(BUDGET_KINDS) == ["capacity", "gflops", "latency_ms"]
    assert all(kind.name == name for name, kind in BUDGET_KINDS.items())
    assert all(kind.description and kind.label for kind in BUDGET_KINDS.values())
    assert [k.unit for k in BUDGET_KINDS.values()] == ["", "GFLOPs", "ms"]
    assert budget_kind("default") is DEFAULT
    with pytest.raises(KeyError):
        budget_kind("joules")


def test_pinned_and_deadline_as_before() -> None:
    pinned = {name: Budget(name, 1.0).pinned for name in ("default", *BUDGET_KINDS)}
    assert pinned == {"default": False, "capacity": True, "gflops": True, "latency_ms": False}
    assert [k.name for k in BUDGET_KINDS.values() if k.deadline] == ["latency_ms"]


def test_capacity_parses_validates_and_picks_its_level(planner: Planner) -> None:
    b = parse(capacity=0.5)
    assert (b.type, b.value, b.kind) == ("capacity", 0.5, BUDGET_KINDS["capacity"])
    assert parse(capacity=1.0 + 5e-10).value == 1.0  # clamped into [min_capacity, 1]
    assert parse(capacity=LO - 5e-10).value == LO
    for frames in (1, 8):
        assert b.kind.level(planner, b.value, frames) == planner.level_of(0.5, frames)
    with pytest.raises(InvalidBudgetError) as exc:
        parse(capacity=1.5)
    assert exc.value.message == "capacity 1.5 is outside [0.125, 1], the capacities this model serves"
    assert exc.value.detail == {"min": LO, "max": 1.0}


def test_gflops_parses_validates_and_picks_its_level(planner: Planner) -> None:
    b = parse(gflops=0.05)
    assert (b.type, b.value) == ("gflops", 0.05)
    assert b.kind.level(planner, b.value, 1) == planner.for_gflops(0.05, 1)
    with pytest.raises(InvalidBudgetError, match=r"^gflops must be positive, got -1$"):
        parse(gflops=-1.0)
    with pytest.raises(InvalidBudgetError, match="below the model's floor"):
        b.kind.level(planner, planner.floor(1).gflops / 2, 1)


def test_latency_is_planned_when_the_batch_forms(planner: Planner) -> None:
    b = parse(latency_ms=50.0)
    assert (b.type, b.value, b.kind.deadline) == ("latency_ms", 50.0, True)
    assert b.kind.level(planner, b.value, 1) is None
    with pytest.raises(InvalidBudgetError, match=r"^latency_ms must be positive, got 0$"):
        parse(latency_ms=0.0)


def test_default_when_none_is_given(planner: Planner) -> None:
    b = parse(capacity=None, gflops=None, latency_ms=None)
    assert (b.type, b.value, b.kind) == ("default", 0.75, DEFAULT)
    assert b.kind.level(planner, b.value, 1) == planner.level_of(0.75, 1)


@pytest.mark.parametrize("name", list(BUDGET_KINDS))
@pytest.mark.parametrize("value", [math.nan, math.inf, True])
def test_every_kind_wants_a_finite_number(name: str, value: float) -> None:
    with pytest.raises(InvalidBudgetError, match=f"^{name} must be a finite number, got {value!r}$"):
        parse(**{name: value})


def test_multiple_and_unknown_kinds() -> None:
    with pytest.raises(InvalidBudgetError) as exc:
        parse(capacity=0.5, latency_ms=10.0)
    assert exc.value.message == "give at most one budget, got ['capacity', 'latency_ms']"
    assert exc.value.detail == {"given": {"capacity": 0.5, "latency_ms": 10.0}}
    with pytest.raises(InvalidBudgetError, match="unknown budget 'joules'"):
        parse(joules=3.0)


# -- over HTTP ---------------------------------------------------------------------------------------------
def _error(r: httpx.Response, code: str, says: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    error = body["error"]
    message = error["message"] if isinstance(error, dict) else error
    if isinstance(error, dict):
        assert error["code"] == code, body
    assert says in message, message


@pytest.mark.anyio
async def test_unknown_and_multiple_kinds_over_http(client: httpx.AsyncClient) -> None:
    image = png(fashion_images(1)[0])
    r = await client.post("/v1/classify", files={"file": image}, data={"joules": "3"})
    _error(r, "validation_error", "invalid request parameters")
    assert r.json()["error"]["detail"]["errors"][0]["field"] == "joules"
    r = await client.post("/v1/classify", files={"file": image}, data={"capacity": "0.5", "gflops": "1"})
    _error(r, "invalid_budget", "give at most one budget, got ['capacity', 'gflops']")
    pixels = {"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    body = {"inputs": [pixels], "parameters": {"gflops": 1.0, "latency_ms": 5.0}}
    r = await client.post("/v2/models/mone/infer", json=body)
    _error(r, "invalid_budget", "give at most one budget, got ['gflops', 'latency_ms']")


@pytest.mark.anyio
async def test_every_kind_is_served_over_http(client: httpx.AsyncClient) -> None:
    image = png(fashion_images(1)[0])
    for name, value in zip(BUDGET_KINDS, ("0.5", "1", "5000"), strict=True):
        r = await client.post("/v1/classify", files={"file": image}, data={name: value})
        assert r.status_code == 200, r.text
        assert r.json()["requested"] == {"type": name, "value": float(value)}


@pytest.mark.anyio
async def test_models_list_the_registry(client: httpx.AsyncClient) -> None:
    budgets = (await client.get("/v1/models")).json()["models"][0]["budgets"]
    assert budgets["kinds"] == [kind.describe() for kind in BUDGET_KINDS.values()]
    assert {"default_capacity", "min_capacity", "floor_gflops", "dense_gflops"} <= set(budgets)
    assert [k["name"] for k in budgets["kinds"]] == ["capacity", "gflops", "latency_ms"]


def test_openapi_mentions_every_kind() -> None:
    schema = create_app(Settings(random_init=True)).openapi()
    classify = schema["paths"]["/v1/classify"]["post"]
    form = classify["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    for kind in BUDGET_KINDS.values():
        assert form[kind.name] == {"type": "string", "description": kind.description}
        assert f"`{kind.name}`" in classify["description"]
        assert kind.description in classify["description"]
    requested = schema["components"]["schemas"]["RequestedBudget"]["properties"]["type"]
    assert "budgets.kinds" in requested["description"]
