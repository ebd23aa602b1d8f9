"""Prometheus metrics with the fixed names of docs/serving.md section 5 (histograms, not summaries).

`Metrics` owns its registry and implements the engine's lifecycle hooks; `MetricsMiddleware` records
requests per route.  With several worker processes set PROMETHEUS_MULTIPROC_DIR (the CLI does) before
prometheus_client is imported: every process writes its samples there and `/metrics` aggregates them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mone.server.core.engine import InferResult

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GFLOPS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
CAPACITY = tuple(i / 16 for i in range(2, 17))


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """Every metric of the contract, registered in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mone_requests", "Requests answered", ["route", "code"], registry=r)
        self.request_duration = Histogram(
            "mone_request_duration_seconds", "End-to-end server time", ["route"], buckets=SECONDS, registry=r
        )
        self.queue_duration = Histogram(
            "mone_queue_duration_seconds", "Time waiting for a batch", buckets=SECONDS, registry=r
        )
        self.compute_duration = Histogram(
            "mone_compute_duration_seconds", "Model time per batch", buckets=SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "mone_batch_size", "Samples per executed batch", buckets=BATCH, registry=r
        )
        self.request_gflops = Histogram(
            "mone_request_gflops", "GFLOPs served per sample", ["kind"], buckets=GFLOPS, registry=r
        )
        self.capacity = Histogram(
            "mone_capacity_served", "Effective capacity served", buckets=CAPACITY, registry=r
        )
        self.gflops = Counter("mone_gflops", "GFLOPs served", registry=r)
        self.gflops_dense = Counter("mone_gflops_dense", "GFLOPs dense inference would have cost", registry=r)
        self.deadline = Counter(
            "mone_deadline", "Requests with latency_ms, by outcome", ["outcome"], registry=r
        )
        self.rejected = Counter("mone_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.cancelled_total = Counter("mone_cancelled", "Requests whose client went away", registry=r)
        # The accounting identity: accepted = succeeded + failed + cancelled (+ in flight).
        self.accepted_total = Counter("mone_accepted", "Requests admitted to the queue", registry=r)
        self.succeeded_total = Counter("mone_succeeded", "Accepted requests answered 200", registry=r)
        self.failed_total = Counter(
            "mone_failed", "Accepted requests answered with an error, by reason", ["reason"], registry=r
        )
        self.queue_depth = Gauge(
            "mone_queue_depth", "Queued samples", registry=r, multiprocess_mode="livesum"
        )
        self.inflight = Gauge(
            "mone_inflight_requests", "Accepted, unanswered samples", registry=r, multiprocess_mode="livesum"
        )
        # Not in docs/serving.md section 5: how late the health watchdog woke (server/http/health.py).
        self.loop_lag = Gauge(
            "mone_event_loop_lag_seconds",
            "How late the event loop ran the health watchdog, last observation",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            "mone_model_info",
            "The served model",
            ["model", "variant", "device"],
            registry=r,
            multiprocess_mode="max",
        )

    def set_model(self, model: str, variant: str, device: str) -> None:
        self.model_info.labels(model=model, variant=variant, device=device).set(1)

    # -- engine hooks --------------------------------------------------------------------------------------
    def batch_done(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.compute_duration.observe(seconds)

    def request_done(self, result: InferResult) -> None:
        gf = result.output.gflops
        self.queue_duration.observe(result.queue_ms / 1e3)
        self.request_gflops.labels(kind=result.kind).observe(gf)
        self.capacity.observe(result.output.realised)
        self.gflops.inc(gf)
        self.gflops_dense.inc(result.dense_gflops)
        if result.deadline_met is not None:
            self.deadline.labels(outcome="met" if result.deadline_met else "missed").inc()

    def cancelled(self) -> None:
        self.cancelled_total.inc()

    def accepted(self) -> None:
        self.accepted_total.inc()

    def settled(self, outcome: str, reason: str) -> None:
        if outcome == "succeeded":
            self.succeeded_total.inc()
        elif outcome == "failed":
            self.failed_total.labels(reason=reason or "internal").inc()

    def load(self, queue_depth: int, inflight: int) -> None:
        self.queue_depth.set(queue_depth)
        self.inflight.set(inflight)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    # -- exposition ----------------------------------------------------------------------------------------
    def render(self) -> bytes:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (unmatched paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # to label requests answered before routing (e.g. 413 on Content-Length)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_label(scope, self.routes)
            self.metrics.requests.labels(route=route, code=str(status["code"])).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - start)


def _route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    path = getattr(route, "path", None)
    return str(path) if path else "other"
