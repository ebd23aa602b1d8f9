"""What the client sends and gets back.

The wire models are the server's own: `clients/wire.py` is a link to `server/http/schemas.py` (which imports
nothing but pydantic), so client and server cannot drift apart, and the client distribution (`clients/`
alone, see clients/pyproject.toml) carries them without torch or FastAPI.  `Result` is the
protocol-neutral view the client returns: the native API and the Open Inference Protocol both map onto it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from mone.clients.wire import (
    ClassifyResponse,
    ErrorBody,
    InferResponse,
    KindCost,
    ModelInfo,
    ModelList,
    Prediction,
    ProfileRow,
    ServedBudget,
    Timing,
)

Protocol = Literal["native", "oip"]
BudgetType = str  # a budget kind's name: the server lists the kinds it takes (`/v1/models` `budgets.kinds`)
NAMED_BUDGETS = ("capacity", "gflops", "latency_ms")  # the kinds `classify` takes as keyword arguments

__all__ = [
    "NAMED_BUDGETS",
    "BudgetKindInfo",
    "BudgetType",
    "ClassifyResponse",
    "ErrorBody",
    "InferResponse",
    "KindCost",
    "ModelInfo",
    "ModelList",
    "Prediction",
    "ProfileRow",
    "Protocol",
    "Result",
    "ServedBudget",
    "Timing",
    "budget_kinds",
]


class BudgetKindInfo(BaseModel):
    """One budget kind a server takes, as `/v1/models` lists it under `budgets.kinds`."""

    name: str = Field(description="the request parameter, e.g. latency_ms")
    unit: str = Field(default="", description="of the value; empty for a capacity e_c")
    label: str = Field(default="", description="a short name, for showing a budget as '<label> <= <value>'")
    description: str = ""
    pinned: bool = Field(default=False, description="never lowered by the server's degrade policy")


def budget_kinds(info: ModelInfo) -> list[BudgetKindInfo]:
    """The budget kinds a model's server takes: its `budgets.kinds`, or `NAMED_BUDGETS` from a server that
    does not list them."""
    listed: Any = info.budgets.get("kinds")
    try:
        if isinstance(listed, list) and listed:
            return [BudgetKindInfo.model_validate(k) for k in listed]
    except ValidationError:
        pass
    return [BudgetKindInfo(name=name, label=name) for name in NAMED_BUDGETS]


class Result(BaseModel):
    """One classified image or clip, whichever protocol carried it."""

    model: str
    protocol: Protocol
    top_k: list[Prediction] = Field(description="most likely classes, most likely first")
    capacity: float = Field(description="e_c the model was run at")
    realised_capacity: float = Field(description="e_c after flooring the token counts")
    gflops: float
    dense_gflops: float = Field(description="what capacity 1 would have cost for the same input")
    deadline_met: bool | None = Field(default=None, description="for a latency_ms budget")
    timing: Timing
    routing: list[list[list[int]]] | None = Field(
        default=None,
        description="per frame, the expert (0 = smallest) of each patch (native API, routing=True)",
    )
    native: ClassifyResponse | None = Field(default=None, description="the full native response")

    @property
    def label(self) -> str:
        return self.top_k[0].label if self.top_k else ""
