"""Request ids and the access log.

Every HTTP answer, errors included, carries `X-Request-ID`: the client's own when it sent a usable one (1 to
128 visible ASCII characters), else one made here (32 hex digits).  When `access_log` is on, each request
writes one JSON line to the `mone.access` logger (stderr by default): the id, method, path, status and
server time, and for inference the input kind, the budget asked, the capacity and GFLOPs served and the
decode / queue / compute times; `error` is the error's code.  Routes fill an `AccessRecord` that the
middleware puts in the ASGI scope.  The line is written out by hand (a third of what json.dumps costs); with
the logging call it takes about 20 us per request on our 2-core machines; with `access_log` off only the id
is made, a few us.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _str
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mone.server.core.budget import Budget
from mone.server.core.engine import InferResult

if TYPE_CHECKING:
    from mone.server.http.tracing import Tracing

log = logging.getLogger("mone.access")
errors_log = logging.getLogger("mone.app")
SCOPE_KEY = "mone.access"
HEADER = b"x-request-id"
_USABLE = re.compile(rb"[\x21-\x7e]{1,128}")


def new_id() -> str:
    return os.urandom(16).hex()


def usable_id(value: bytes | str | None) -> str:
    """The client's id when it is usable, else a new one."""
    if value is None:
        return new_id()
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw.decode("ascii") if _USABLE.fullmatch(raw) else new_id()


class AccessRecord:
    """One request's line of the access log, filled in as the request goes."""

    __slots__ = (
        "id",
        "kind",
        "samples",
        "budget_type",
        "budget_value",
        "capacity",
        "gflops",
        "decode_ms",
        "queue_ms",
        "compute_ms",
        "error",
        "arrival",
        "results",
    )

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.kind: str | None = None
        self.samples = 0
        self.budget_type: str | None = None
        self.budget_value: float | None = None
        self.capacity: float | None = None
        self.gflops: float | None = None
        self.decode_ms: float | None = None
        self.queue_ms: float | None = None
        self.compute_ms: float | None = None
        self.error: str | None = None
        self.arrival = 0.0  # time.monotonic() when the route took the request
        self.results: Sequence[InferResult] | None = None

    def ask(self, budget: Budget) -> None:
        self.budget_type, self.budget_value = budget.type, budget.value

    def serve(self, results: Sequence[InferResult], decode_ms: float, arrival: float) -> None:
        """The served account of a request's samples (the least capacity, the total GFLOPs, the longest
        queue and compute times, as the Open Inference Protocol's answer gives them)."""
        self.ask(results[0].budget)
        self.results, self.arrival = results, arrival
        self.samples = len(results)
        kinds = {r.kind for r in results}
        self.kind = kinds.pop() if len(kinds) == 1 else "mixed"
        self.capacity = min(r.level.capacity for r in results)
        self.gflops = sum(r.output.gflops for r in results)
        self.decode_ms = decode_ms
        self.queue_ms = max(r.queue_ms for r in results)
        self.compute_ms = max(r.compute_ms for r in results)

    def line(self, method: str, path: str, status: int, ms: float) -> str:
        """The JSON line, written out by hand: json.dumps of the same object costs about three times more."""
        parts = [
            f'{{"ts":{time.time():.3f},"id":{_str(self.id)},"method":{_str(method)},"path":{_str(path)},'
            f'"status":{status},"ms":{ms:.3f}'
        ]
        if self.kind is not None:
            parts.append(f',"kind":"{self.kind}","samples":{self.samples}')
        if self.budget_type is not None:
            parts.append(f',"budget":"{self.budget_type}","budget_value":{_num(self.budget_value)}')
        if self.capacity is not None:
            parts.append(
                f',"capacity":{_num(self.capacity)},"gflops":{_num(self.gflops)},'
                f'"decode_ms":{self.decode_ms or 0.0:.3f},"queue_ms":{self.queue_ms or 0.0:.3f},'
                f'"compute_ms":{self.compute_ms or 0.0:.3f}'
            )
        if self.error is not None:
            parts.append(f',"error":{_str(self.error)}')
        parts.append("}")
        return "".join(parts)


def _num(v: float | None) -> str:
    """A finite number as JSON (repr is exact and round-trips), null otherwise."""
    return repr(float(v)) if v is not None and math.isfinite(v) else "null"


def record_of(request: Request | Scope) -> AccessRecord | None:
    """The request's access record (None outside the middleware, e.g. in unit tests of a router)."""
    scope = request.scope if isinstance(request, Request) else request
    record: AccessRecord | None = scope.get(SCOPE_KEY)
    return record


def configure_access_log(enabled: bool) -> None:
    """`mone.access` writes bare JSON lines to stderr, whatever the root logger's format and level."""
    log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.CRITICAL + 1)
    if enabled and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


class RequestIdMiddleware:
    """Gives every HTTP request its id and access record, puts the id on the answer, and writes the line.

    An exception that no handler took becomes the 500 answer here, so that it carries the id too.
    """

    def __init__(self, app: ASGIApp, error_body: Any, tracing: Tracing | None = None) -> None:
        self.app = app
        self.error_body = error_body  # (message, path) -> ASGI app answering the error
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        record = AccessRecord(usable_id(given))
        scope[SCOPE_KEY] = record
        header = (HEADER, record.id.encode())
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            errors_log.exception("unhandled error on %s", scope["path"])
            if started:
                raise
            record.error = "internal"
            await self.error_body(f"internal error: {type(exc).__name__}", scope["path"])(
                scope, receive, send_with_id
            )
        finally:
            end = time.monotonic()
            if log.isEnabledFor(logging.INFO):
                log.info(record.line(scope["method"], scope["path"], status, (end - start) * 1e3))
            if self.tracing is not None:
                self._trace(scope, record, start, end, status)

    def _trace(self, scope: Scope, record: AccessRecord, start: float, end: float, status: int) -> None:
        assert self.tracing is not None
        route = getattr(scope.get("route"), "path", None) or scope["path"]
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"], "http.route": route}
        try:
            name, carrier = f"{scope['method']} {route}", _headers(scope["headers"])
            self.tracing.request(name, carrier, attributes, record, start, end, status)
        except Exception:  # tracing must never fail a request
            errors_log.exception("tracing %s failed", scope["path"])


def _headers(raw: Any) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
