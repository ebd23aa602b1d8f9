"""Request and response models of the native API and of the Open Inference Protocol (KServe v2 REST).

Imports nothing but pydantic, so that a client can share it without torch or FastAPI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


# -- errors --------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. too_large, invalid_budget, overloaded")
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- native API ----------------------------------------------------------------------------------------------
class ClassifyParams(BaseModel):
    """Form fields (multipart) or query parameters (raw body) of POST /v1/classify.

    Besides these, one optional number per budget kind (`capacity`, `gflops`, `latency_ms`): the server adds
    those fields from its registry of kinds (server/http/deps.py `CLASSIFY_PARAMS`), which this module, shared
    with the client, cannot import; `/v1/models` lists them under `budgets.kinds`."""

    model_config = ConfigDict(extra="forbid")

    deadline_ms: float | None = Field(None, description="hard deadline: 504 if it cannot be met", gt=0)
    top_k: int = Field(5, ge=1, le=1000)
    routing: bool = Field(False, description="include the token -> expert map per frame")
    kind: Literal["auto", "image", "clip"] = Field(
        "auto", description="auto: MP4/WebM are clips, the rest images"
    )


class RequestedBudget(BaseModel):
    type: str = Field(description="the budget kind asked for (`/v1/models` `budgets.kinds`), or default")
    value: float


class ServedBudget(BaseModel):
    capacity: float = Field(description="e_c the model was run at")
    realised_capacity: float = Field(description="e_c after flooring the token counts")
    capacity_distribution: list[float] = Field(description="c_1..c_E, smallest expert first (MoNE Eq. 3)")
    expert_counts: list[int] = Field(description="tokens per expert in each frame, smallest expert first")
    gflops: float = Field(description="analytic GFLOPs of this sample")
    dense_gflops: float = Field(description="GFLOPs at capacity 1 for the same input")
    degraded: bool = Field(description="capacity lowered by the degrade overload policy")
    planned_ms: float | None = Field(
        None, description="predicted server time when the batch formed (latency_ms)"
    )
    deadline_met: bool | None = Field(None, description="for latency_ms: server time <= budget")


class Timing(BaseModel):
    decode_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float


class Prediction(BaseModel):
    label: str
    index: int
    prob: float


class ClassifyResponse(BaseModel):
    model: str
    kind: str = Field(description="the kind the input was decoded as (`/v1/models` `input.kinds`)")
    frames: int
    requested: RequestedBudget
    served: ServedBudget
    timing: Timing
    batch_size: int
    top_k: list[Prediction]
    routing: list[list[list[int]]] | None = Field(
        None, description="per frame, the expert (0 = smallest) of each patch on the patch grid"
    )


class KindCost(BaseModel):
    gflops: float = Field(description="analytic GFLOPs of one input of this kind")
    latency_ms_batch1: float = Field(description="predicted compute time of a batch of one")
    latency_ms_max_batch: float = Field(description="predicted compute time of a full batch (max_batch_size)")


class ProfileRow(BaseModel):
    capacity: float
    realised_capacity: float
    capacity_distribution: list[float]
    expert_counts: list[int]
    image: KindCost
    clip: KindCost
    accuracy: float | None = Field(
        None, description="from the checkpoint's evaluation, where it has this e_c"
    )
    clip_accuracy: float | None = None


class ModelInfo(BaseModel):
    name: str
    variant: str
    device: str
    ready: bool
    labels: list[str]
    config: dict[str, Any]
    input: dict[str, Any]
    budgets: dict[str, Any] = Field(
        description="default and lowest capacity, floor and dense GFLOPs per input kind, and `kinds`: the "
        "budget kinds a request may name (name, unit, label, description, pinned)"
    )
    profile: list[ProfileRow]
    latency_model: dict[str, Any] = Field(description="coefficients per frames-per-sample, refreshed online")
    evaluation: dict[str, Any] | None = Field(description="the checkpoint's capacity -> accuracy profile")
    batching: dict[str, Any]
    checkpoint: dict[str, Any]


class ModelList(BaseModel):
    models: list[ModelInfo]


# -- Open Inference Protocol ---------------------------------------------------------------------------------
Parameters = dict[str, str | int | float | bool]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = None


class InferInputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(None, description="absent when the values follow as binary data")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[InferOutputTensor]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool
