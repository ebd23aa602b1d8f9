"""The Open Inference Protocol's gRPC API (`inference.GRPCInferenceService`,
server/http/proto/inference.proto) on
`grpc_port`, served by grpc.aio on the app's event loop and started and stopped by its lifespan.

The same engine, budgets, decoding and outputs as the REST routes (server/http/oip.py): the budget (one
of the kinds of server/core/budget_kinds.py: `capacity`, `gflops`, `latency_ms`) and `top_k`, `kind`,
`deadline_ms` go in the request's or an input's `parameters`; inputs come as `raw_input_contents` (what
tritonclient sends) or typed `contents` (`bytes_contents` holds one encoded image or clip per element,
`fp32_contents` the pixels); outputs go back as `raw_output_contents`.
Errors are gRPC status codes with the REST message; the call's `x-request-id` metadata (or a new id) comes
back in the trailing metadata, with `mone-error-code` on errors, and each call writes an access-log line.
With `api_key` set, ModelMetadata, ModelReady and ModelInfer need `authorization: Bearer <key>` metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import torch
from fastapi import FastAPI
from google.protobuf.message import Message

from mone.server import __version__
from mone.server.config import Settings
from mone.server.core.engine import Engine
from mone.server.errors import (
    NOT_REJECTIONS,
    STATUS,
    BadInputError,
    ClientGoneError,
    InternalError,
    NotReadyError,
    OverloadedError,
    ServeError,
    UnauthorizedError,
)
from mone.server.http.access import AccessRecord, usable_id
from mone.server.http.access import log as access_log
from mone.server.http.auth import bearer_ok
from mone.server.http.deps import check_model
from mone.server.http.metrics import Metrics
from mone.server.http.oip import (
    EXTENSIONS,
    OUTPUTS,
    SERVER_NAME,
    oip_model_metadata,
    oip_samples,
    output_tensors,
    response_parameters,
)
from mone.server.http.oip_tensors import InputTensor, raw_input, unsupported
from mone.server.http.pipeline import Pipeline
from mone.server.http.proto import inference_pb2 as pb
from mone.server.http.proto import inference_pb2_grpc
from mone.server.http.schemas import Parameters

if TYPE_CHECKING:
    from mone.server.http.tracing import Tracing

log = logging.getLogger("mone.grpc")
SERVICE = "inference.GRPCInferenceService"
R = TypeVar("R", bound=Message)

CODES: dict[str, grpc.StatusCode] = {
    "bad_input": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_media_type": grpc.StatusCode.INVALID_ARGUMENT,
    "validation_error": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_budget": grpc.StatusCode.INVALID_ARGUMENT,
    "too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "over_limit": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "not_ready": grpc.StatusCode.UNAVAILABLE,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "internal": grpc.StatusCode.INTERNAL,
}


class InferenceService:
    """The servicer: one method per RPC, each wrapped by `_call` (id, key, errors, metrics, access log)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.settings: Settings = app.state.settings
        self.metrics: Metrics = app.state.metrics
        self.tracing: Tracing | None = getattr(app.state, "tracing", None)
        key = self.settings.api_key
        self._key = key.get_secret_value().encode() if key is not None else None

    @property
    def engine(self) -> Engine:
        engine: Engine = self.app.state.engine
        return engine

    @property
    def pipeline(self) -> Pipeline:
        pipeline: Pipeline | None = getattr(self.app.state, "pipeline", None)
        if pipeline is None:
            raise NotReadyError("the model is not ready")
        return pipeline

    # -- the RPCs ------------------------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        live = self.engine.stuck() is None  # not live while an inference batch is stuck, as /healthz
        return await self._call(
            "ServerLive", context, False, lambda _: _done(pb.ServerLiveResponse(live=live))
        )

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        ready = self.engine.ready
        return await self._call(
            "ServerReady", context, False, lambda _: _done(pb.ServerReadyResponse(ready=ready))
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        answer = pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)
        return await self._call("ServerMetadata", context, False, lambda _: _done(answer))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        def ready(_: AccessRecord) -> Awaitable[pb.ModelReadyResponse]:
            check_model(request.name, self.settings)
            return _done(pb.ModelReadyResponse(ready=self.engine.ready))

        return await self._call("ModelReady", context, True, ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        def metadata(_: AccessRecord) -> Awaitable[pb.ModelMetadataResponse]:
            check_model(request.name, self.settings)
            m = oip_model_metadata(request.name, self.engine)
            tensors = [
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in m.inputs
            ]
            outputs = [
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in m.outputs
            ]
            return _done(
                pb.ModelMetadataResponse(
                    name=m.name, versions=m.versions, platform=m.platform, inputs=tensors, outputs=outputs
                )
            )

        return await self._call("ModelMetadata", context, True, metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ModelInfer", context, True, lambda record: self._infer(request, record))

    # -- inference -----------------------------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, record: AccessRecord) -> pb.ModelInferResponse:
        arrival = time.monotonic()
        pipeline, settings = self.pipeline, self.settings
        check_model(request.model_name, settings)
        pipeline.admit()  # an overloaded server refuses before reading the inputs
        inputs = _inputs(request)
        wanted = [o.name for o in request.outputs] or list(OUTPUTS)
        for name in wanted:
            if name not in OUTPUTS:
                raise BadInputError(f"no output named {name!r}; the outputs are {', '.join(OUTPUTS)}")
        params = _parameters(request.parameters)
        # A cancelled call cancels its handler task, and with it the wait for the results: no guard.
        served = await pipeline.classify(
            oip_samples(inputs, params, pipeline.engine, settings), arrival=arrival, record=record
        )
        answer = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for key, value in response_parameters(served.results, served.decode_ms, arrival).items():
            _set_parameter(answer.parameters[key], value)
        for out in output_tensors(served.results, pipeline.engine):
            if out.name in wanted:
                answer.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
                answer.raw_output_contents.append(out.raw())
        return answer

    # -- the frame around every RPC ------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        needs_key: bool,
        work: Callable[[AccessRecord], Awaitable[R]],
    ) -> R:
        start = time.monotonic()
        metadata = _metadata(context)
        record = AccessRecord(usable_id(metadata.get("x-request-id")))
        trailing: list[tuple[str, str]] = [("x-request-id", record.id)]
        status = 200
        try:
            if needs_key:
                self._check_key(metadata)
            answer = await work(record)
        except ServeError as exc:
            status = STATUS.get(exc.code, 500)
            record.error = exc.code
            if exc.code not in NOT_REJECTIONS:
                self.metrics.reject(exc.reason)
            trailing.append(("mone-error-code", exc.code))
            if isinstance(exc, OverloadedError):
                trailing.append(("retry-after", exc.retry_after_header))
            context.set_trailing_metadata(tuple(trailing))
            await context.abort(CODES.get(exc.code, grpc.StatusCode.INTERNAL), exc.message)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: the engine dropped it
            status, record.error = STATUS[ClientGoneError.code], ClientGoneError.code
            raise
        except Exception as exc:
            log.exception("unhandled error in %s", method)
            status = 500
            record.error = InternalError.code
            trailing.append(("mone-error-code", InternalError.code))
            context.set_trailing_metadata(tuple(trailing))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            route = f"/{SERVICE}/{method}"
            end = time.monotonic()
            self.metrics.requests.labels(route=route, code=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(end - start)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(record.line("GRPC", route, status, (end - start) * 1e3))
            if self.tracing is not None:
                self._trace(route, metadata, record, start, end, status)
        context.set_trailing_metadata(tuple(trailing))
        return answer

    def _trace(
        self,
        route: str,
        metadata: Mapping[str, str],
        record: AccessRecord,
        start: float,
        end: float,
        status: int,
    ) -> None:
        assert self.tracing is not None
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": route.rsplit("/", 1)[1]}
        try:
            self.tracing.request(route.lstrip("/"), metadata, attributes, record, start, end, status)
        except Exception:  # tracing must never fail a call
            log.exception("tracing %s failed", route)

    def _check_key(self, metadata: Mapping[str, str]) -> None:
        if self._key is not None and not bearer_ok(metadata.get("authorization", "").encode(), self._key):
            raise UnauthorizedError("missing or wrong bearer token")


async def _done(answer: R) -> R:
    return answer


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _parameter(p: pb.InferParameter) -> str | int | float | bool:
    choice = p.WhichOneof("parameter_choice")
    if choice is None:
        raise BadInputError("a parameter without a value")
    value: str | int | float | bool = getattr(p, choice)
    return value


def _parameters(params: Mapping[str, pb.InferParameter]) -> Parameters:
    return {key: _parameter(value) for key, value in params.items()}


def _set_parameter(p: pb.InferParameter, value: str | int | float | bool) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if not request.inputs:
        raise BadInputError("no inputs")
    out = []
    for i, t in enumerate(request.inputs):
        shape, params = list(t.shape), _parameters(t.parameters)
        if raw:
            out.append(raw_input(t.name, t.datatype, shape, params, raw[i]))
        elif t.datatype == "BYTES":
            elements = list(t.contents.bytes_contents)
            _count(t.name, len(elements), shape)
            out.append(InputTensor(t.name, t.datatype, shape, params, elements=elements))
        elif t.datatype == "FP32":
            values = t.contents.fp32_contents
            _count(t.name, len(values), shape)
            x = torch.tensor(values, dtype=torch.float32).view(shape)
            out.append(InputTensor(t.name, t.datatype, shape, params, values=x))
        else:
            raise unsupported(t.name, t.datatype)
    return out


def _count(name: str, count: int, shape: list[int]) -> None:
    n = 1
    for d in shape:
        if d < 0:
            raise BadInputError(f"input {name!r}: negative dimension in shape {shape}")
        n *= d
    if count != n:
        raise BadInputError(f"input {name!r}: {count} elements for shape {shape}")


class GrpcServer:
    """The gRPC listener of one server process.  With several uvicorn workers each binds the port with
    SO_REUSEPORT and a call reaches one of them; with one, a port already in use fails the start-up."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        options = [
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
        # As uvicorn's limit_concurrency does for HTTP: calls beyond it get RESOURCE_EXHAUSTED at once.
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.limit_concurrency)
        add = inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
        add(InferenceService(app), self.server)  # type: ignore[no-untyped-call]
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            self.port: int = self.server.add_insecure_port(address)
        except RuntimeError as exc:  # the port is taken, or the address is not this machine's
            raise RuntimeError(f"cannot listen for gRPC on {address} (grpc_port): {exc}") from None

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let the running ones finish (up to grace_s), cancel the rest."""
        await self.server.stop(grace_s)
