"""Open Inference Protocol (KServe v2 REST) routes, so that the server drops into KServe/Triton tooling.

Inputs: a `BYTES` tensor of base64-encoded images/clips (shape [B]), or an `FP32` tensor of the model's
normalised input, shape [B, C, H, W] or [B, T, C, H, W].  Budgets (`capacity`, `gflops`, `latency_ms`) and
`top_k`, `kind`, `deadline_ms` go in `parameters`, request-level or per input (per input wins).  Outputs:
`logits` (FP32 [B, classes]), `label` (BYTES [B]), `capacity` and `gflops` (FP32 [B], what was served);
the response `parameters` carry the served budget and timing (per-request totals for B > 1).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request, Response
from torch import Tensor

from server import __version__
from server.budget import Budget, parse_budget
from server.config import Settings
from server.deps import (
    EngineDep,
    SettingsDep,
    cancel_on_disconnect,
    check_model,
    decode_payload,
    get_clip_decoder,
    require_key,
)
from server.engine import Engine, InferResult
from server.errors import BadInputError, InvalidParamsError
from server.schemas import (
    InferInputTensor,
    InferOutputTensor,
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
from server.video import ClipDecoder

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
models = APIRouter(prefix="/v2/models", tags=["open inference protocol"], dependencies=[Depends(require_key)])


@router.get("", response_model=ServerMetadata)
async def get_server_metadata() -> ServerMetadata:
    """Server metadata."""
    return ServerMetadata(name="mone-serve", version=__version__, extensions=[])


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


@models.post("/{name}/infer", response_model=InferResponse, response_model_exclude_none=True)
@models.post("/{name}/versions/{version}/infer", response_model=InferResponse, include_in_schema=False)
async def post_infer(
    name: str, body: InferRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> InferResponse:
    """Inference; the budget goes in `parameters`."""
    arrival = time.monotonic()
    check_model(name, settings)
    engine.shed_if_full()  # an overloaded server refuses before decoding
    jobs: list[tuple[Tensor, Parameters]] = []
    with engine.coming():
        for tensor in body.inputs:
            params = {**(body.parameters or {}), **(tensor.parameters or {})}
            samples = await _input_samples(tensor, params, engine, settings, get_clip_decoder(request))
            jobs += [(x, params) for x in samples]
    if not jobs:
        raise InvalidParamsError("the request holds no samples (an empty batch)")
    decode_ms = (time.monotonic() - arrival) * 1e3
    work = [
        engine.infer(
            x, _budget(p, settings.default_capacity, engine.cfg.min_capacity), arrival=arrival, **_options(p)
        )
        for x, p in jobs
    ]
    results = await cancel_on_disconnect(request, asyncio.gather(*work))
    return _response(name, body, results, engine, decode_ms, arrival)


async def _input_samples(
    t: InferInputTensor, params: Parameters, engine: Engine, settings: Settings, clips: ClipDecoder | None
) -> list[Tensor]:
    if t.datatype == "BYTES":
        if len(t.data) != math.prod(t.shape):
            raise BadInputError(f"input {t.name!r}: {len(t.data)} elements for shape {t.shape}")
        kind = str(params.get("kind", "auto"))
        if kind not in ("auto", "image", "clip"):
            raise BadInputError(f"kind must be auto, image or clip, got {kind!r}")
        out = []
        for element in t.data:
            data = _b64(element, t.name)
            decoded = await decode_payload(data, engine, settings, kind, clips)  # type: ignore[arg-type]
            out.append(decoded.tensor)
        return out
    if t.datatype == "FP32":
        return _pixels(t, engine)
    raise BadInputError(f"input {t.name!r}: datatype {t.datatype} is not supported (BYTES or FP32)")


def _b64(element: Any, name: str) -> bytes:
    if isinstance(element, dict) and "b64" in element:
        element = element["b64"]
    if not isinstance(element, str):
        raise BadInputError(f"input {name!r}: BYTES elements must be base64 strings")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInputError(f"input {name!r}: not valid base64 ({exc})") from None


def _pixels(t: InferInputTensor, engine: Engine) -> list[Tensor]:
    c = engine.cfg
    frame = [c.in_chans, c.img_size, c.img_size]
    if len(t.shape) not in (4, 5) or t.shape[-3:] != frame:
        raise BadInputError(
            f"input {t.name!r}: FP32 shape must be [B, {frame}] or [B, T, {frame}], got {t.shape}"
        )
    if t.shape[0] < 1 or (len(t.shape) == 5 and t.shape[1] < 1):
        what = "an empty batch (B = 0)" if t.shape[0] < 1 else "clips of zero frames (T = 0)"
        raise InvalidParamsError(f"input {t.name!r}: shape {t.shape} is {what}")
    flat = _flatten(t.data)
    if len(flat) != math.prod(t.shape):
        raise BadInputError(f"input {t.name!r}: {len(flat)} values for shape {t.shape}")
    try:
        x = torch.tensor(flat, dtype=torch.float32).view(t.shape)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"input {t.name!r}: data must be numbers ({exc})") from None
    if not torch.isfinite(x).all():
        raise InvalidParamsError(f"input {t.name!r}: data contains NaN or infinity")
    x = x if x.dim() == 5 else x.unsqueeze(1)  # (B, T, C, H, W)
    return list(x.unbind(0))


def _flatten(data: list[Any]) -> list[Any]:
    if data and isinstance(data[0], list):
        return [v for row in data for v in _flatten(row)]
    return data


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


def _budget(params: Parameters, default_capacity: float, min_capacity: float) -> Budget:
    return parse_budget(
        _number(params, "capacity"),
        _number(params, "gflops"),
        _number(params, "latency_ms"),
        default_capacity,
        min_capacity,
    )


def _options(params: Parameters) -> dict[str, Any]:
    top_k = _number(params, "top_k")
    return {"top_k": int(top_k) if top_k else 1, "deadline_ms": _number(params, "deadline_ms")}


def _response(
    name: str,
    body: InferRequest,
    results: list[InferResult],
    engine: Engine,
    decode_ms: float,
    arrival: float,
) -> InferResponse:
    labels = engine.runner.checkpoint.labels
    B, K = len(results), engine.cfg.num_classes
    outputs = [
        InferOutputTensor(
            name="logits", datatype="FP32", shape=[B, K], data=[v for r in results for v in r.output.logits]
        ),
        InferOutputTensor(
            name="label", datatype="BYTES", shape=[B], data=[labels[r.output.top_indices[0]] for r in results]
        ),
        InferOutputTensor(
            name="capacity", datatype="FP32", shape=[B], data=[r.output.realised for r in results]
        ),
        InferOutputTensor(name="gflops", datatype="FP32", shape=[B], data=[r.output.gflops for r in results]),
    ]
    if body.outputs:
        wanted = {o.name for o in body.outputs}
        outputs = [o for o in outputs if o.name in wanted]
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
    return InferResponse(model_name=name, model_version="1", id=body.id, parameters=params, outputs=outputs)
