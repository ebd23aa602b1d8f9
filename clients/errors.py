"""Typed errors: each carries the server's `code`, `message`, `detail` and the HTTP status."""

from __future__ import annotations

from typing import Any

import httpx


class MoneError(Exception):
    """Any error answered by mone-serve (or a transport failure, with status 0)."""

    def __init__(
        self, message: str, *, status: int = 0, code: str = "error", detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.message = message
        self.status = status
        self.code = code
        self.detail: dict[str, Any] = detail or {}


class BadRequest(MoneError):
    """400/413/415/422: the request or its file was refused (bad input, too large, invalid budget...)."""


class Unauthorized(MoneError):
    """401: missing or wrong API key."""


class NotFound(MoneError):
    """404: no such model or route."""


class Overloaded(MoneError):
    """429: the queue is full (after the client's retries)."""

    retry_after: float | None = None


class NotReady(MoneError):
    """503: the model is loading or the server is draining."""


class DeadlineExceeded(MoneError):
    """504: the request's deadline expired before it could run."""


class ServerError(MoneError):
    """500 and other unexpected statuses."""


class TransportError(MoneError):
    """No HTTP answer: the connection was refused or reset."""


class Timeout(TransportError):
    """No answer within the client's timeout."""


_BY_STATUS: dict[int, type[MoneError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    429: Overloaded,
    503: NotReady,
    504: DeadlineExceeded,
}


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (the delta-seconds form; an HTTP date is ignored)."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def from_response(response: httpx.Response) -> MoneError:
    """Map an error response (native `{"error": {...}}` or OIP `{"error": "...", "code"}`) to an exception."""
    code, message = "http_error", response.reason_phrase or "error"
    detail: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
            detail = error.get("detail") or {}
        elif isinstance(error, str):
            code, message, detail = str(body.get("code", code)), error, body.get("detail") or {}
    elif response.text:
        message = response.text[:200]
    cls = _BY_STATUS.get(response.status_code, ServerError)
    exc = cls(message, status=response.status_code, code=code, detail=detail)
    if isinstance(exc, Overloaded):
        exc.retry_after = retry_after(response)
    return exc
