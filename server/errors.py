"""The error vocabulary of the server, shared by decoding, planning and the engine.

Each error has a stable `code` (the `error.code` of the JSON body), a `reason` (the label of
`mone_rejected_total`) and a `detail` object.  Which HTTP status a code maps to is decided once, in
`STATUS`, and used only by the web layer; the JSON body of an error is built once, by `error_body`.
"""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """Base class: a request the server answers with a documented error."""

    code = "internal"
    reason = "internal"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail


class BadInputError(ServeError):
    """Malformed request or undecodable payload."""

    code = "bad_input"
    reason = "bad_input"


class UnsupportedMediaError(ServeError):
    """A format outside the allow-list; its decoder is never invoked."""

    code = "unsupported_media_type"
    reason = "bad_input"


class TooLargeError(ServeError):
    """Body, pixels or video dimensions over a limit."""

    code = "too_large"
    reason = "too_large"


class OverLimitError(ServeError):
    """A well-formed input that exceeds a limit on frames, duration, decode time or compute."""

    code = "over_limit"
    reason = "too_large"


class InvalidParamsError(ServeError):
    """Request parameters of the wrong type or range."""

    code = "validation_error"
    reason = "bad_input"


class InvalidBudgetError(ServeError):
    """A budget outside what the model can serve (e.g. GFLOPs below the floor)."""

    code = "invalid_budget"
    reason = "bad_input"


class OverloadedError(ServeError):
    """The queue is full; retry after `retry_after` seconds."""

    code = "overloaded"
    reason = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0, **detail: Any) -> None:
        super().__init__(message, retry_after_s=retry_after, **detail)
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """`retry_after` as a Retry-After value: whole seconds, at least 1."""
        return str(int(max(1, round(self.retry_after))))


class DeadlineExceededError(ServeError):
    """The request's hard deadline expired (or cannot be met) before it ran."""

    code = "deadline_exceeded"
    reason = "deadline"


class NotReadyError(ServeError):
    """The model is not loaded yet or the server is draining."""

    code = "not_ready"
    reason = "not_ready"


class NotFoundError(ServeError):
    code = "not_found"
    reason = "not_found"


class UnauthorizedError(ServeError):
    code = "unauthorized"
    reason = "unauthorized"


class ClientGoneError(ServeError):
    """The client went away while its request was queued or running."""

    code = "cancelled"
    reason = "cancelled"


class InternalError(ServeError):
    code = "internal"
    reason = "internal"


STATUS: dict[str, int] = {
    BadInputError.code: 400,
    UnauthorizedError.code: 401,
    NotFoundError.code: 404,
    TooLargeError.code: 413,
    UnsupportedMediaError.code: 415,
    OverLimitError.code: 422,
    InvalidBudgetError.code: 422,
    InvalidParamsError.code: 422,
    OverloadedError.code: 429,
    ClientGoneError.code: 499,
    InternalError.code: 500,
    NotReadyError.code: 503,
    DeadlineExceededError.code: 504,
}

# Failures that are not the server refusing a request (not counted in mone_rejected_total).
NOT_REJECTIONS = (ClientGoneError.code, InternalError.code)


def error_body(
    code: str, message: str, detail: dict[str, Any] | None = None, *, oip: bool = False
) -> dict[str, Any]:
    """The JSON body of an error: `{"error": {"code", "message", "detail"}}`; for the Open Inference
    Protocol (`oip`, the /v2 routes) `{"error": "<message>", "code", "detail"}`, so that KServe/Triton
    clients can read it."""
    if oip:
        return {"error": message, "code": code, "detail": detail or {}}
    return {"error": {"code": code, "message": message, "detail": detail or {}}}
