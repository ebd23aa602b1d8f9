"""FastAPI dependencies and the request-side helpers the routers share.

Routers stay thin: they fetch the request pipeline (server/http/pipeline.py), the engine and the settings
from here, hand the pipeline the request's samples and map its results to a response model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import Field, create_model

from mone.server.config import Settings
from mone.server.core.budget_kinds import BUDGET_KINDS
from mone.server.core.engine import Engine
from mone.server.errors import ClientGoneError, NotFoundError, NotReadyError
from mone.server.http.metrics import Metrics
from mone.server.http.pipeline import Pipeline
from mone.server.http.schemas import ClassifyParams

T = TypeVar("T")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_pipeline(request: Request) -> Pipeline:
    """The app's request pipeline, made by its lifespan once the engine exists."""
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise NotReadyError("the model is not ready")
    return pipeline


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _classify_params() -> type[ClassifyParams]:
    """`ClassifyParams` with one optional number per budget kind, named and described by the registry."""
    budgets: dict[str, Any] = {
        kind.name: (float | None, Field(None, description=kind.description, gt=kind.gt))
        for kind in BUDGET_KINDS.values()
    }
    return create_model("ClassifyParams", __base__=ClassifyParams, **budgets)


CLASSIFY_PARAMS = _classify_params()
"""The form fields / query parameters of POST /v1/classify, budget kinds included."""


def budget_params(params: ClassifyParams) -> dict[str, float | None]:
    """The value of each budget kind in `params` (None where not given), for `parse_budget`."""
    return {name: getattr(params, name) for name in BUDGET_KINDS}


def check_model(name: str, settings: Settings) -> None:
    if name != settings.model_name:
        raise NotFoundError(f"no model named {name!r}", models=[settings.model_name])


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (the engine drops queued items)."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        pending: set[asyncio.Future[Any]] = {task, watcher}
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGoneError("client disconnected")
