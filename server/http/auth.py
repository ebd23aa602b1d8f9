"""Bearer API key as ASGI middleware, checked before anything else reads the request.

Sitting outside the body limit and the routes, it answers 401 (with `WWW-Authenticate`) to a caller without
the key whatever else is wrong with the request: an unauthenticated caller learns nothing about body limits,
readiness or overload.  It is the one check of the key on HTTP (no route repeats it; gRPC checks its
`authorization` metadata with `bearer_ok`, server/http/grpc_api.py).  The key is compared in constant time.
Health and readiness stay open for probes; `/metrics` is protected unless `metrics_public` is set.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from mone.server.errors import UnauthorizedError, error_body
from mone.server.http.metrics import Metrics

PROTECTED = ("/v1/", "/v2/models")
WWW_AUTHENTICATE = 'Bearer realm="mone-serve"'


def bearer_ok(header: bytes, key: bytes) -> bool:
    scheme, _, token = header.partition(b" ")
    # compare_digest runs in time independent of where the strings differ (their lengths may leak)
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, metrics: Metrics, metrics_public: bool = False) -> None:
        self.app = app
        self.key = api_key.encode()
        self.metrics = metrics
        self.metrics_public = metrics_public

    def protected(self, path: str) -> bool:
        if path == "/metrics":
            return not self.metrics_public
        return path.startswith(PROTECTED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        if bearer_ok(dict(scope["headers"]).get(b"authorization", b""), self.key):
            await self.app(scope, receive, send)
            return
        self.metrics.reject(UnauthorizedError.reason)
        message = "missing or wrong bearer token"
        body = error_body(UnauthorizedError.code, message, oip=scope["path"].startswith("/v2"))
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"www-authenticate", WWW_AUTHENTICATE.encode()),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
