"""Budget kinds: the one place that says what a request may ask for, and what each kind means.

A request carries at most one budget, named by its kind: `capacity` (an effective capacity e_c), `gflops`
(analytic GFLOPs per sample) or `latency_ms` (server time); none means `default` (the server's
`default_capacity`).  A `BudgetKind` holds everything the server knows about one kind: its name (the request
parameter of every protocol, and `Budget.type`), unit, a one-line description (the OpenAPI description and
`/v1/models` `budgets.kinds`), whether it is pinned (never lowered by the degrade policy), how a value is
validated and how it picks a capacity level.  `BUDGET_KINDS` is the registry, in the order parameters are
read: `parse_budget` (server/core/budget.py) validates through it, the engine, batcher and scheduler ask the
kind instead of comparing names, the native form/query model and the OpenAPI description are built from it
(server/http/deps.py, routes.py), OIP REST and gRPC read its names from `parameters` (server/http/oip.py),
and `/v1/models` lists it (server/http/metadata.py), where the client, CLI, load generator and web page
read it at run time.

Goal: adding a budget kind (say an energy budget in joules) touches this registry plus at most three other
files.  For joules: the kind here; `Planner.for_joules` (server/core/budget.py), the level whose GFLOPs x
joules per GFLOP fit; the device's `joules_per_gflop` (server/config.py); and the engine handing it to its
`Planner` (server/core/engine.py).  The wire schema, OpenAPI, OIP/gRPC parameters, `/v1/models`, access log,
traces, client, CLI, load generator and web page follow the registry.  server/README.md, "Adding a budget
kind", walks through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from mone.server.errors import InvalidBudgetError

if TYPE_CHECKING:
    from mone.server.core.budget import Level, Planner

Validate = Callable[[str, float, float], float]  # (name, finite value, min_capacity) -> value to serve
PickLevel = Callable[["Planner", float, int], "Level | None"]  # (planner, value, frames) -> level


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget.

    Attributes:
        name: the request parameter (native form field or query parameter, OIP/gRPC `parameters` key) and
            `Budget.type`.
        unit: of the value ("" for a dimensionless e_c).
        label: a short human name, for a budget shown as "<label> <= <value> <unit>".
        description: one line, for the OpenAPI description and `/v1/models`.
        pinned: never lowered by the degrade overload policy.
        validate: (name, finite value, min_capacity) -> the value to serve; raises InvalidBudgetError.
        pick: (planner, value, frames) -> the level at admission; None: picked when the batch forms.
        gt: an exclusive lower bound the wire schema checks as well (pydantic `gt`), None if model-dependent.
        deadline: the value is server time in ms from arrival: the level is picked when the batch forms (the
            largest predicted to fit, server/core/scheduling.py), the arrival counts for the rate estimate
            of latency-budgeted requests, and the answer says whether the deadline was met.
    """

    name: str
    unit: str
    label: str
    description: str
    pinned: bool
    validate: Validate
    pick: PickLevel
    gt: float | None = None
    deadline: bool = False

    def parse(self, value: float, min_capacity: float) -> float:
        """The value to serve, or InvalidBudgetError (422) with the message clients see."""
        if isinstance(value, bool) or not math.isfinite(value):
            raise InvalidBudgetError(f"{self.name} must be a finite number, got {value!r}")
        return self.validate(self.name, value, min_capacity)

    def level(self, planner: Planner, value: float, frames: int) -> Level | None:
        """The level a request of this kind runs at, decided at admission; None when its batch decides."""
        return self.pick(planner, value, frames)

    def describe(self) -> dict[str, str | bool]:
        """The kind as `/v1/models` lists it under `budgets.kinds`."""
        return {
            "name": self.name,
            "unit": self.unit,
            "label": self.label,
            "description": self.description,
            "pinned": self.pinned,
        }


# -- validation ----------------------------------------------------------------------------------------------
def capacity_in_range(name: str, value: float, min_capacity: float) -> float:
    """An e_c the model serves, [min_capacity, 1] (1e-9 slack, then clamped)."""
    if not min_capacity - 1e-9 <= value <= 1.0 + 1e-9:
        raise InvalidBudgetError(
            f"{name} {value:g} is outside [{min_capacity:g}, 1], the capacities this model serves",
            min=min_capacity,
            max=1.0,
        )
    return float(min(max(value, min_capacity), 1.0))


def positive(name: str, value: float, min_capacity: float) -> float:
    """Any positive amount."""
    if value <= 0:
        raise InvalidBudgetError(f"{name} must be positive, got {value:g}")
    return float(value)


# -- picking a level -----------------------------------------------------------------------------------------
def level_of_capacity(planner: Planner, value: float, frames: int) -> Level:
    """The level the e_c falls on."""
    return planner.level_of(value, frames)


def largest_within_gflops(planner: Planner, value: float, frames: int) -> Level:
    """The largest level whose analytic GFLOPs fit (`Planner.for_gflops`; 422 below the floor)."""
    return planner.for_gflops(value, frames)


def when_batch_forms(planner: Planner, value: float, frames: int) -> None:
    """None: the largest level predicted to fit is picked when the batch forms (BatchPlanner.plan)."""
    return None


# -- the registry --------------------------------------------------------------------------------------------
DEFAULT = BudgetKind(
    name="default",
    unit="",
    label="default",
    description="no budget given: the server's default_capacity, lowered by the degrade policy under load",
    pinned=False,
    validate=capacity_in_range,
    pick=level_of_capacity,
)

BUDGET_KINDS: Mapping[str, BudgetKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            BudgetKind(
                name="capacity",
                unit="",
                label="capacity",
                description="effective capacity e_c in [1/2**(E-1), 1] for E experts (1/8 for 4)",
                pinned=True,
                validate=capacity_in_range,
                pick=level_of_capacity,
            ),
            BudgetKind(
                name="gflops",
                unit="GFLOPs",
                label="compute",
                description="GFLOPs budget per sample for this input",
                pinned=True,
                validate=positive,
                pick=largest_within_gflops,
                gt=0.0,
            ),
            BudgetKind(
                name="latency_ms",
                unit="ms",
                label="latency",
                description="server-side latency budget (soft: served at the floor)",
                pinned=False,
                validate=positive,
                pick=when_batch_forms,
                gt=0.0,
                deadline=True,
            ),
        )
    }
)
"""The budget kinds a request may name, in the order they are read."""


def budget_kind(name: str) -> BudgetKind:
    """The kind of a `Budget.type`: one of `BUDGET_KINDS`, or `default`; KeyError for anything else."""
    return DEFAULT if name == "default" else BUDGET_KINDS[name]
