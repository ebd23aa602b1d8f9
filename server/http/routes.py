"""Native API: /v1/classify, /v1/models, health, readiness and metrics (docs/serving.md section 3.1)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from mone.model import capacity_distribution
from mone.server.core.budget import parse_budget
from mone.server.core.budget_kinds import BUDGET_KINDS
from mone.server.core.engine import Engine, InferResult
from mone.server.errors import BadInputError, InvalidParamsError, NotReadyError, TooLargeError
from mone.server.http.access import record_of
from mone.server.http.deps import (
    CLASSIFY_PARAMS,
    EngineDep,
    MetricsDep,
    SettingsDep,
    budget_params,
    cancel_on_disconnect,
    check_model,
    get_pipeline,
    get_settings,
)
from mone.server.http.metadata import model_metadata
from mone.server.http.pipeline import Options, Sample
from mone.server.http.schemas import (
    ClassifyParams,
    ClassifyResponse,
    ModelInfo,
    ModelList,
    Prediction,
    RequestedBudget,
    ServedBudget,
    Timing,
)

router = APIRouter(tags=["native"])
v1 = APIRouter(prefix="/v1", tags=["native"])  # the API key: AuthMiddleware (server/http/auth.py)

CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        **{
                            k: {"type": "string", **({"description": f.description} if f.description else {})}
                            for k, f in CLASSIFY_PARAMS.model_fields.items()
                        },
                    },
                }
            },
            **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in ("image/*", "video/*")},
        },
    }
}


@router.get("/healthz", response_model=None)
async def get_health(request: Request) -> dict[str, object] | JSONResponse:
    """Liveness: answers without touching the model; 503 `stuck` while an inference batch runs far past its
    predicted time (a hung forward, which only a restart ends)."""
    engine: Engine | None = getattr(request.app.state, "engine", None)
    stuck = engine.stuck() if engine is not None else None
    if stuck is not None:
        return JSONResponse({"status": "stuck", **stuck}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz")
async def get_ready(engine: EngineDep) -> dict[str, str]:
    """Readiness: the model is loaded, warm and calibrated; 503 while starting or draining."""
    if not engine.ready:
        raise NotReadyError("the model is not ready")
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
async def get_metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@v1.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    """The served model(s) with labels, input spec and capacity profile."""
    return ModelList(models=[model_metadata(engine, settings.model_name)])


@v1.get("/models/{name}", response_model=ModelInfo)
async def get_model(name: str, engine: EngineDep, settings: SettingsDep) -> ModelInfo:
    """One model's metadata."""
    check_model(name, settings)
    return model_metadata(engine, name)


CLASSIFY_DESCRIPTION = (
    "Classify an image or clip (multipart `file`, or the raw bytes as the body with the other fields as "
    "query parameters) under at most one budget:\n\n"
    + "\n".join(f"* `{k.name}` ({k.unit or 'e_c'}): {k.description}" for k in BUDGET_KINDS.values())
)


@v1.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=CLASSIFY_BODY,
    description=CLASSIFY_DESCRIPTION,
)
async def post_classify(request: Request) -> Response:
    """Classify an image or clip under at most one budget (`CLASSIFY_DESCRIPTION`)."""
    arrival = time.monotonic()
    # The hot path: the pipeline and settings are fetched here, not declared as FastAPI dependencies, whose
    # resolution cost the event loop about 10 % of its time per request under load.
    pipeline, settings = await get_pipeline(request), await get_settings(request)
    engine = pipeline.engine
    data, fields = await _read_input(request, settings.max_body_bytes)
    params = _parse_params(fields, settings.default_top_k)
    budget = parse_budget(budget_params(params), settings.default_capacity, engine.cfg.min_capacity)
    options = Options(budget, params.top_k, routing=params.routing, deadline_ms=params.deadline_ms)
    served = await pipeline.classify(
        [Sample(data, params.kind, options)],
        arrival=arrival,
        record=record_of(request),
        guard=lambda work: cancel_on_disconnect(request, work),
    )
    [result] = served.results
    answer = build_response(result, settings.model_name, engine.labels, served.decode_ms, arrival)
    # Serialised here, once: returned as a model, FastAPI would validate it against `response_model` again
    # (a second pass over every field) before encoding it.
    return Response(answer.model_dump_json(), media_type="application/json")


async def _read_input(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadInputError("multipart request without a `file` part")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise TooLargeError(f"file larger than {limit} bytes")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        await form.close()
        return data, fields
    return await request.body(), dict(request.query_params)


def _parse_params(fields: dict[str, str], default_top_k: int) -> ClassifyParams:
    values: dict[str, Any] = {"top_k": default_top_k}
    values.update({k: v for k, v in fields.items() if v != ""})
    try:
        return CLASSIFY_PARAMS.model_validate(values)
    except ValidationError as exc:
        errors = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
        raise InvalidParamsError("invalid request parameters", errors=errors) from None


def build_response(
    result: InferResult, model: str, labels: list[str], decode_ms: float, arrival: float
) -> ClassifyResponse:
    out, level = result.output, result.level
    routing = None
    if out.experts is not None:
        T, N = out.experts.shape
        g = int(round(N**0.5))
        routing = out.experts.view(T, g, g).tolist()
    return ClassifyResponse(
        model=model,
        kind=result.kind,
        frames=result.frames,
        requested=RequestedBudget(type=result.budget.type, value=result.budget.value),
        served=ServedBudget(
            capacity=level.capacity,
            realised_capacity=out.realised,
            capacity_distribution=list(capacity_distribution(level.capacity, len(out.counts))),
            expert_counts=list(out.counts),
            gflops=out.gflops,
            dense_gflops=result.dense_gflops,
            degraded=result.degraded,
            planned_ms=result.planned_ms,
            deadline_met=result.deadline_met,
        ),
        timing=Timing(
            decode_ms=decode_ms,
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
            total_ms=(time.monotonic() - arrival) * 1e3,
        ),
        batch_size=result.batch_size,
        top_k=[
            Prediction(label=labels[i], index=i, prob=p)
            for i, p in zip(out.top_indices, out.top_probs, strict=True)
        ],
        routing=routing,
    )
