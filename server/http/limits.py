"""Request-body limit as ASGI middleware: uvicorn has none of its own.

A declared Content-Length over the limit is answered 413 before the body is read; a chunked or lying body
is cut off as soon as the limit is crossed (the route sees `TooLargeError`, answered 413 too).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mone.server.errors import TooLargeError
from mone.server.http.metrics import Metrics


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, length.decode("latin-1"))
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLargeError(f"request body larger than {self.limit} bytes", limit=self.limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, length: str) -> None:
        self.metrics.reject("too_large")
        body = {
            "error": {
                "code": TooLargeError.code,
                "message": f"request body of {length} bytes is larger than {self.limit} bytes",
                "detail": {"limit": self.limit},
            }
        }
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send(
            {"type": "http.response.start", "status": 413, "headers": headers + [(b"connection", b"close")]}
        )
        await send({"type": "http.response.body", "body": payload})
