"""Ray Serve deployment of the same FastAPI app (docs/serving.md section 7): replicas behind Ray's HTTP proxy,
autoscaling on ongoing requests.

    serve run docker/ray/serve.yaml             # config file (import_path: mone.server.ray_app:app_builder)
    serve run mone.server.ray_app:app_builder    # defaults: settings from the replicas' MONE_* env

Each replica builds its own app with `create_app` and runs its lifespan (load, warm-up, calibration, drain
on shutdown), so budgets, batching and admission behave exactly as in one `mone-serve` process; Ray spreads
requests over replicas and scales their number.  Responses carry `X-Mone-Replica` (Ray's replica id) so that
a client or a test can see which replica answered.  `/metrics` of one replica covers every replica on its
node when PROMETHEUS_MULTIPROC_DIR names a directory they share (the config file sets it).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mone.server.config import Settings
from mone.server.http.app import create_app

REPLICA_HEADER = "x-mone-replica"


class ReplicaHeaderMiddleware:
    """Adds `X-Mone-Replica: <replica id>` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (unit use): the process id still tells processes apart
        return f"pid-{os.getpid()}"


@serve.ingress()
class MoneReplica:
    """One replica: one mone-serve app (one model, one batcher) built inside the replica process.

    Args:
        settings: `Settings` fields that override the replica's MONE_* environment.
    """

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = Settings(**(settings or {}))
        self.mone_app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:  # before the app creates its metrics
            os.makedirs(shared, exist_ok=True)
        app = create_app(self.settings)
        app.add_middleware(ReplicaHeaderMiddleware, replica=_replica_id())
        self.mone_app = app
        return app

    def check_health(self) -> None:
        """Ray's replica health check: fails while the engine exists but is not ready."""
        engine = getattr(self.mone_app.state, "engine", None) if self.mone_app else None
        if engine is not None and not engine.ready:
            raise RuntimeError("mone-serve engine is not ready")


MoneServe = serve.deployment(
    name="MoneServe",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,  # > max_batch_size so that a replica can fill its batches
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=30,
    health_check_period_s=10,
)(MoneReplica)


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """Entry point for `serve run` / a serve config: `args` (the config's `args:`) are Settings fields."""
    return MoneServe.bind(dict(args or {}))
