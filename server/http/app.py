"""The FastAPI application: `create_app()`, its lifespan (load, warm up, calibrate, drain) and the one error
schema `{"error": {"code", "message", "detail"}}` for every failure."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from mone.server import __version__
from mone.server.config import Settings, get_settings
from mone.server.core.engine import Engine
from mone.server.core.runner import Runner, load_model, resolve_device, serial_thread
from mone.server.errors import (
    NOT_REJECTIONS,
    STATUS,
    ClientGoneError,
    InternalError,
    NotReadyError,
    OverloadedError,
    ServeError,
    UnauthorizedError,
    error_body,
)
from mone.server.http import oip, routes
from mone.server.http.access import RequestIdMiddleware, configure_access_log, record_of
from mone.server.http.auth import WWW_AUTHENTICATE, AuthMiddleware
from mone.server.http.health import (
    HealthListener,
    HealthState,
    Watchdog,
    mark_draining_on_signals,
    reuse_port_supported,
)
from mone.server.http.limits import BodyLimitMiddleware
from mone.server.http.metrics import Metrics, MetricsMiddleware
from mone.server.http.pipeline import Pipeline
from mone.server.media.decode_pool import DecodePool

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from mone.server.http.grpc_api import GrpcServer

log = logging.getLogger("mone.app")
WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"  # clients/ beside server/
INFERENCE_PATHS = re.compile(r"^/(v1/classify|v2/models/[^/]+(/versions/[^/]+)?/infer)$")


def error_response(
    code: str, message: str, detail: dict[str, object] | None = None, path: str = ""
) -> JSONResponse:
    """The native error schema; under /v2 the Open Inference Protocol's `{"error": "<message>"}` (plus
    `code` and `detail`), so that KServe/Triton clients can read it."""
    body = error_body(code, message, detail, oip=path.startswith("/v2"))
    return JSONResponse(body, status_code=STATUS.get(code, 500))


def create_app(settings: Settings | None = None, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """Build the app; the model is loaded by the lifespan, so importing this module is cheap.  Requests are
    traced to `tracer_provider` when given, else as `otel_exporter` says (server/http/tracing.py)."""
    settings = settings or get_settings()
    metrics = Metrics()
    owned = None
    if tracer_provider is None and settings.otel_exporter != "none":
        from mone.server.http.tracing import provider_from_settings

        tracer_provider = owned = provider_from_settings(settings)
    tracing = None
    if tracer_provider is not None:
        from mone.server.http.tracing import Tracing

        tracing = Tracing(tracer_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Under load, the inference thread (Python between torch ops), the decoding threads and the loop take
        # turns at the GIL; at Python's 5 ms a probe waited up to ~50 ms (p99) for its turn, at 1 ms ~25 ms.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1e3)
        # Only the inference thread runs an OpenMP team: the loop (which loads the model) and the threads
        # it hands work to keep to one intra-op thread (server/core/runner.py).
        serial_thread()
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="mone-io", initializer=serial_thread)
        )
        health: HealthListener | None = None
        clips: DecodePool | None = None
        watchdog: Watchdog | None = None
        engine: Engine | None = None
        grpc_server: GrpcServer | None = None
        try:  # a start-up that fails part-way undoes what it had started, as a stop does
            health = start_health_listener(settings)
            app.state.health = health
            # The decode workers start first: they import their modules while the model loads.
            clips = DecodePool(settings.decode_workers) if settings.decode_isolation == "process" else None
            app.state.clips = clips
            device = resolve_device(settings.device)
            checkpoint = load_model(settings, device)
            engine = Engine(Runner.from_settings(checkpoint, device, settings), settings, events=metrics)
            app.state.engine = engine
            # Every inference request's stages; it owns the budget of pixels in decoding.
            app.state.pipeline = Pipeline(engine, settings, clips)
            metrics.set_model(settings.model_name, checkpoint.config.variant, str(device))
            if clips is not None:
                await asyncio.to_thread(clips.wait_ready)
            await engine.start()
            if settings.grpc_port:
                from mone.server.http.grpc_api import GrpcServer  # grpc is loaded only when it serves

                grpc_server = GrpcServer(app, settings)
                await grpc_server.start()
                app.state.grpc = grpc_server
                log.info("gRPC (Open Inference Protocol) on %s:%d", settings.host, grpc_server.port)
            if health is not None:
                health.state.ready = lambda: engine.ready
                health.state.stuck = engine.stuck
                watchdog = Watchdog(health.state, on_lag=metrics.loop_lag.set)
                watchdog.start()  # armed once ready: a blocking model load is not a stall
            log.info("ready: %s (%s) on %s", settings.model_name, checkpoint.config.variant, device)
            yield
        finally:
            if grpc_server is not None:  # refuses new calls, lets the running ones finish
                await grpc_server.stop(float(settings.timeout_graceful_shutdown))
            if engine is not None:
                await engine.stop(drain_s=float(settings.timeout_graceful_shutdown))
            if watchdog is not None:
                await watchdog.stop()
            if health is not None:
                health.stop()  # on the loop's thread: it puts the signal handlers back
            if clips is not None:
                await asyncio.to_thread(clips.close)
            sys.setswitchinterval(switch_interval)
            if owned is not None and tracing is not None:
                tracing.shutdown()  # exports the spans still buffered

    app = FastAPI(
        title="mone-serve",
        version=__version__,
        description="MoNE vision transformers with per-request compute budgets",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.include_router(routes.router)
    app.include_router(routes.v1)
    app.include_router(oip.router)
    app.include_router(oip.models)
    if WEB_DIR.is_dir():  # the web page, after every API route so that it only answers what they do not
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    _add_error_handlers(app, metrics)
    app.add_middleware(ShedMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    if settings.api_key is not None:  # outside the body limit: no key, no other answer than 401
        key = settings.api_key.get_secret_value()
        app.add_middleware(
            AuthMiddleware, api_key=key, metrics=metrics, metrics_public=settings.metrics_public
        )
    app.add_middleware(RequestIdMiddleware, error_body=_internal_error, tracing=tracing)
    configure_access_log(settings.access_log)
    known = [*routes.router.routes, *routes.v1.routes, *oip.router.routes, *oip.models.routes]
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=known)
    return app


def _internal_error(message: str, path: str) -> JSONResponse:
    return error_response(InternalError.code, message, path=path)


def _note_error(scope: Scope, code: str) -> None:
    record = record_of(scope)
    if record is not None:
        record.error = code


def start_health_listener(settings: Settings) -> HealthListener | None:
    """The probe listener of server/http/health.py, when `health_port` is set.  With several uvicorn workers
    every worker binds the port with SO_REUSEPORT and a probe reaches one of them."""
    if not settings.health_port:
        return None
    reuse = settings.workers > 1
    if reuse and not reuse_port_supported():
        log.warning("health_port %d: off, SO_REUSEPORT is needed with several workers", settings.health_port)
        return None
    state = HealthState(settings.health_stale_s)
    listener = HealthListener(state, settings.host, settings.health_port, reuse_port=reuse)
    listener.start()
    listener.on_stop = mark_draining_on_signals(state)
    log.info("probe listener on %s:%d (/healthz, /readyz)", settings.host, listener.port)
    return listener


def serve_error_response(exc: ServeError, path: str, metrics: Metrics) -> JSONResponse:
    """The answer to a ServeError, counted in mone_rejected_total when it is a rejection."""
    if exc.code not in NOT_REJECTIONS:
        metrics.reject(exc.reason)
    response = error_response(exc.code, exc.message, exc.detail, path)
    if isinstance(exc, OverloadedError):
        response.headers["Retry-After"] = exc.retry_after_header
    if isinstance(exc, UnauthorizedError):
        response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return response


# uvicorn reads up to 64 KiB of a body before it stops reading the socket (its flow-control high-water mark).
EARLY_REFUSAL_KEEP_ALIVE_BYTES = 64 * 1024


class ShedMiddleware:
    """Answers an inference request 429 (queue full) or 503 (not ready) before its body is parsed.

    Under overload most requests are refused; parsing their multipart or JSON bodies first would spend the
    CPU that the admitted ones need, and receiving a large upload first would keep the client waiting.  A
    request that declares its Content-Length is answered from its headers, before its body is read; above
    `EARLY_REFUSAL_KEEP_ALIVE_BYTES` the answer also closes the connection (the client stops uploading),
    below it the connection stays usable (uvicorn's parser skips the unread body).  A chunked body has no
    length to judge by: it is received and dropped, chunk by chunk.  Inside the key check and the body
    limit: 401 and 413 come first.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and INFERENCE_PATHS.match(scope["path"]):
            engine: Engine | None = getattr(scope["app"].state, "engine", None)
            try:
                if engine is None:
                    raise NotReadyError("the model is not ready")
                engine.shed_if_full()
            except ServeError as exc:
                length = dict(scope["headers"]).get(b"content-length")
                if length is not None and length.isdigit():
                    # Declared: answer from the headers, before any of the body is read.  A large body
                    # closes the connection, so that the client stops sending it.
                    response = serve_error_response(exc, scope["path"], self.metrics)
                    if int(length) > EARLY_REFUSAL_KEEP_ALIVE_BYTES:
                        response.headers["connection"] = "close"
                    await response(scope, receive, send)
                    return
                refusal = exc
                try:
                    while True:  # chunked: drop the body
                        message = await receive()
                        if message["type"] != "http.request" or not message.get("more_body", False):
                            break
                except ServeError as too_large:  # the body limit cut it off: that answer comes first
                    refusal = too_large
                _note_error(scope, refusal.code)
                await serve_error_response(refusal, scope["path"], self.metrics)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        _note_error(request.scope, exc.code)
        return serve_error_response(exc, request.url.path, metrics)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left while sending its body: nobody reads this answer, but it is a 499, not a 500.
        _note_error(request.scope, ClientGoneError.code)
        return error_response(ClientGoneError.code, "client disconnected", path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject("bad_input")
        _note_error(request.scope, "validation_error")
        errors = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
        message = "request does not match the schema"
        return error_response("validation_error", message, {"errors": errors}, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        _note_error(request.scope, code)
        response = error_response(code, str(exc.detail), path=request.url.path)
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            InternalError.code, f"internal error: {type(exc).__name__}", path=request.url.path
        )


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory mone.server.http.app:app_factory` (settings from the env)."""
    return create_app(get_settings())
