"""FastAPI dependencies and the request-side helpers the routers share.

Routers stay thin: they fetch the engine and settings from here, call `decode_payload` and `serve`, and map
the result to a response model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import Field, create_model

from mone.server.config import Settings
from mone.server.core.budget_kinds import BUDGET_KINDS
from mone.server.core.engine import Engine
from mone.server.errors import ClientGoneError, NotFoundError, UnauthorizedError
from mone.server.http.metrics import Metrics
from mone.server.http.schemas import ClassifyParams
from mone.server.media.decode import Decoded, Kind, decode
from mone.server.media.decode_budget import header_pixels
from mone.server.media.video import ClipDecoder

T = TypeVar("T")

# A small image is decoded on the event loop (`inline_decode_pixels`): a 28x28 PNG takes about 50 us, less
# than handing it to a thread and back.  The byte cap bounds what Pillow may scan (a GIF's frame count).
INLINE_DECODE_BYTES = 64 << 10


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_key(request: Request) -> None:
    """Bearer token check for inference and model routes (only when an api_key is configured).

    It calls `get_settings` itself rather than declaring `SettingsDep`: it runs on every request, and each
    dependency FastAPI resolves costs the event loop time."""
    settings = await get_settings(request)
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    want = settings.api_key.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), want):
        raise UnauthorizedError("missing or wrong bearer token")


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


def get_clip_decoder(request: Request) -> ClipDecoder | None:
    """The app's pool of clip decode workers; None decodes clips in the request's thread."""
    clips: ClipDecoder | None = getattr(request.app.state, "clips", None)
    return clips


async def decode_payload(
    data: bytes, engine: Engine, settings: Settings, kind: Kind = "auto", clips: ClipDecoder | None = None
) -> Decoded:
    """Decode off the event loop (clips in `clips`, the worker processes, when given), images within the
    server's budget of pixels in decoding (server/media/decode_budget.py); small images on the loop itself."""
    pixels = header_pixels(data) if kind != "clip" else 0
    async with engine.decode_budget.hold(pixels):
        if 0 < pixels <= settings.inline_decode_pixels and len(data) <= INLINE_DECODE_BYTES:
            return decode(data, engine.cfg, settings, kind, clips)
        return await asyncio.to_thread(decode, data, engine.cfg, settings, kind, clips)


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


def first_not_none(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
