"""Open Inference Protocol (KServe v2 REST) routes, so that the server drops into KServe/Triton tooling.

Inputs: a `BYTES` tensor of encoded images/clips (shape [B]; base64 strings in JSON, the raw files as binary
data), or an `FP32` tensor of the model's normalised input, shape [B, C, H, W] or [B, T, C, H, W].  The body
is read as JSON whatever its content type, and may carry Triton's binary tensor data
(server/http/oip_tensors.py).
Budgets (one of the kinds of server/core/budget_kinds.py: `capacity`, `gflops`, `latency_ms`) and `top_k`,
`kind`, `deadline_ms` go in `parameters`, request-level or per input (per input wins).  Outputs: `logits`
(FP32 [B, classes]), `label` (BYTES [B]), `capacity` and `gflops` (FP32 [B], what was served); the response
`parameters` carry the served budget and timing (per-request totals for B > 1).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from torch import Tensor

from mone.server import __version__
from mone.server.config import Settings
from mone.server.core.budget import parse_budget
from mone.server.core.budget_kinds import BUDGET_KINDS
from mone.server.core.engine import Engine, InferResult
from mone.server.errors import BadInputError, InvalidParamsError
from mone.server.http.access import record_of
from mone.server.http.deps import (
    EngineDep,
    SettingsDep,
    cancel_on_disconnect,
    check_model,
    get_pipeline,
    get_settings,
)
from mone.server.http.oip_tensors import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    InputTensor,
    OutputTensor,
    http_body,
    parse_http_body,
    wants_binary,
)
from mone.server.http.pipeline import Options, Sample
from mone.server.http.schemas import (
    InferRequest,
    InferResponse,
    LiveResponse,
    ModelMetadata,
    ModelReadyResponse,
    Parameters,
    ReadyResponse,
    ServerMetadata,
    TensorMetadata,
)
from mone.server.media.kinds import INPUT_KINDS

SERVER_NAME = "mone-serve"
KINDS: tuple[str, ...] = ("auto", *INPUT_KINDS)  # what `kind` an encoded input may ask for
EXTENSIONS = ("binary_tensor_data",)
router = APIRouter(prefix="/v2", tags=["open inference protocol"])
# The API key of these routes is checked by AuthMiddleware (server/http/auth.py).
models = APIRouter(prefix="/v2/models", tags=["open inference protocol"])


@router.get("", response_model=ServerMetadata)
async def get_server_metadata() -> ServerMetadata:
    """Server metadata."""
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))


@router.get("/health/live", response_model=LiveResponse)
async def get_live(request: Request, response: Response) -> LiveResponse:
    """Liveness (503 while an inference batch is stuck, as /healthz)."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    live = engine is None or engine.stuck() is None
    response.status_code = 200 if live else 503
    return LiveResponse(live=live)


@router.get("/health/ready", response_model=ReadyResponse)
async def get_server_ready(engine: EngineDep, response: Response) -> ReadyResponse:
    """Readiness (503 while not ready)."""
    response.status_code = 200 if engine.ready else 503
    return ReadyResponse(ready=engine.ready)


@models.get("/{name}", response_model=ModelMetadata)
@models.get("/{name}/versions/{version}", response_model=ModelMetadata, include_in_schema=False)
async def get_model_metadata(name: str, engine: EngineDep, settings: SettingsDep) -> ModelMetadata:
    """Model metadata: inputs and outputs."""
    check_model(name, settings)
    return oip_model_metadata(name, engine)


def oip_model_metadata(name: str, engine: Engine) -> ModelMetadata:
    c = engine.cfg
    return ModelMetadata(
        name=name,
        versions=["1"],
        platform="pytorch_mone",
        inputs=[
            TensorMetadata(name="input", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="pixels", datatype="FP32", shape=[-1, c.in_chans, c.img_size, c.img_size]),
        ],
        outputs=[
            TensorMetadata(name="logits", datatype="FP32", shape=[-1, c.num_classes]),
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="capacity", datatype="FP32", shape=[-1]),
            TensorMetadata(name="gflops", datatype="FP32", shape=[-1]),
        ],
        parameters={"variant": c.variant, "min_capacity": c.min_capacity, "frames_per_clip": c.num_frames},
    )


@models.get("/{name}/ready", response_model=ModelReadyResponse)
@models.get("/{name}/versions/{version}/ready", response_model=ModelReadyResponse, include_in_schema=False)
async def get_model_ready(
    name: str, engine: EngineDep, settings: SettingsDep, response: Response
) -> ModelReadyResponse:
    """Model readiness."""
    check_model(name, settings)
    response.status_code = 200 if engine.ready else 503
    return ModelReadyResponse(name=name, ready=engine.ready)


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                }
            },
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@models.post("/{name}/infer", response_model=InferResponse, openapi_extra=INFER_BODY)
@models.post("/{name}/versions/{version}/infer", response_model=InferResponse, include_in_schema=False)
async def post_infer(name: str, request: Request) -> Response:
    """Inference; the budget goes in `parameters`.  The body is JSON whatever its content type says, or JSON
    followed by binary tensor data (`Inference-Header-Content-Length`)."""
    arrival = time.monotonic()
    pipeline, settings = await get_pipeline(request), await get_settings(request)
    check_model(name, settings)
    pipeline.admit()  # an overloaded server refuses before parsing the body
    body, inputs = parse_http_body(await request.body(), request.headers.get(HEADER_LENGTH))
    params = body.parameters or {}
    binary = _binary_outputs(body, params)
    served = await pipeline.classify(
        oip_samples(inputs, params, pipeline.engine, settings),
        arrival=arrival,
        record=record_of(request),
        guard=lambda work: cancel_on_disconnect(request, work),
    )
    results = served.results
    outputs = [o for o in output_tensors(results, pipeline.engine) if o.name in binary]
    head: dict[str, Any] = {"model_name": name, "model_version": "1"}
    if body.id is not None:
        head["id"] = body.id
    head["parameters"] = response_parameters(results, served.decode_ms, arrival)
    content, header_length = http_body(head, outputs, [binary[o.name] for o in outputs])
    if header_length is None:
        return Response(content, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(content, media_type=BINARY_CONTENT_TYPE, headers=headers)


def _binary_outputs(body: InferRequest, params: Parameters) -> dict[str, bool]:
    """The outputs to return, each with whether it travels as binary data."""
    default = wants_binary(params.get("binary_data_output"))
    if not body.outputs:
        return dict.fromkeys(OUTPUTS, default)
    wanted = {}
    for o in body.outputs:
        if o.name not in OUTPUTS:
            raise BadInputError(f"no output named {o.name!r}; the outputs are {', '.join(OUTPUTS)}")
        flag = (o.parameters or {}).get("binary_data")
        wanted[o.name] = default if flag is None else wants_binary(flag)
    return wanted


def oip_samples(
    inputs: list[InputTensor], params: Parameters, engine: Engine, settings: Settings
) -> list[Sample]:
    """The samples of a request's inputs, each with its input's parameters over the request's (per input
    wins); their options are parsed after decoding, sample by sample."""
    samples: list[Sample] = []
    for tensor in inputs:
        p = {**params, **tensor.parameters}
        options = partial(_sample_options, p, settings.default_capacity, engine.cfg.min_capacity)
        if tensor.elements is not None:
            asked = str(p.get("kind", "auto"))
            if asked not in KINDS:
                raise BadInputError(f"kind must be auto, image or clip, got {asked!r}")
            kind = asked
            samples += [Sample(data, kind, options) for data in tensor.elements]
        else:
            assert tensor.values is not None
            pixels, pixels_kind = _pixels(tensor.name, tensor.values, engine)
            samples += [Sample(x, pixels_kind, options) for x in pixels]
    return samples


def _pixels(name: str, x: Tensor, engine: Engine) -> tuple[list[Tensor], str]:
    """The samples of an FP32 input: [B, C, H, W] images or [B, T, C, H, W] clips."""
    c = engine.cfg
    frame = [c.in_chans, c.img_size, c.img_size]
    shape = list(x.shape)
    if len(shape) not in (4, 5) or shape[-3:] != frame:
        raise BadInputError(
            f"input {name!r}: FP32 shape must be [B, {frame}] or [B, T, {frame}], got {shape}"
        )
    if shape[0] < 1 or (len(shape) == 5 and shape[1] < 1):
        what = "an empty batch (B = 0)" if shape[0] < 1 else "clips of zero frames (T = 0)"
        raise InvalidParamsError(f"input {name!r}: shape {shape} is {what}")
    if not torch.isfinite(x).all():
        raise InvalidParamsError(f"input {name!r}: data contains NaN or infinity")
    if x.dim() == 5:
        return list(x.unbind(0)), "clip"
    return list(x.unsqueeze(1).unbind(0)), "image"  # (B, T=1, C, H, W)


def _number(params: Parameters, key: str) -> float | None:
    v = params.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise InvalidParamsError(f"parameter {key} must be a number")
    try:
        return float(v)
    except ValueError:
        raise InvalidParamsError(f"parameter {key} must be a number, got {v!r}") from None


def _sample_options(params: Parameters, default_capacity: float, min_capacity: float) -> Options:
    """A sample's budget, `top_k` (default 1) and `deadline_ms` from its parameters."""
    budget = parse_budget(
        {name: _number(params, name) for name in BUDGET_KINDS}, default_capacity, min_capacity
    )
    top_k = _number(params, "top_k")
    return Options(budget, int(top_k) if top_k else 1, deadline_ms=_number(params, "deadline_ms"))


OUTPUTS = ("logits", "label", "capacity", "gflops")


def output_tensors(results: list[InferResult], engine: Engine) -> list[OutputTensor]:
    """`logits`, `label`, `capacity` and `gflops`, one row per sample."""
    labels = engine.labels
    B, K = len(results), engine.cfg.num_classes
    return [
        OutputTensor("logits", "FP32", [B, K], values=[v for r in results for v in r.output.logits]),
        OutputTensor(
            "label", "BYTES", [B], elements=[labels[r.output.top_indices[0]].encode() for r in results]
        ),
        OutputTensor("capacity", "FP32", [B], values=[r.output.realised for r in results]),
        OutputTensor("gflops", "FP32", [B], values=[r.output.gflops for r in results]),
    ]


def response_parameters(results: list[InferResult], decode_ms: float, arrival: float) -> Parameters:
    """The served budget and timing (per-request totals for B > 1)."""
    params: Parameters = {
        "budget_type": results[0].budget.type,
        "capacity": min(r.level.capacity for r in results),
        "realised_capacity": min(r.output.realised for r in results),
        "gflops": sum(r.output.gflops for r in results),
        "dense_gflops": sum(r.dense_gflops for r in results),
        "decode_ms": decode_ms,
        "queue_ms": max(r.queue_ms for r in results),
        "compute_ms": max(r.compute_ms for r in results),
        "total_ms": (time.monotonic() - arrival) * 1e3,
    }
    met = [r.deadline_met for r in results if r.deadline_met is not None]
    if met:
        params["deadline_met"] = all(met)
    return params
