"""OpenTelemetry tracing of requests, off unless configured (`otel_exporter`; or a `TracerProvider` handed to
`create_app`).  Off, nothing here is imported and a request pays one `is None` test.

Each request (HTTP, or a gRPC call) is one SERVER span, a child of the caller's W3C `traceparent` when it
sends one, with the request id, the budget asked, the capacity and GFLOPs served and the status as attributes.
Its children, drawn after the answer from the times the engine recorded (so that nothing is traced on the
batch loop itself): `decode`, then per sample `queue` (waiting for a batch) and `batch` (planning to results,
with the batch size and the sample's capacity) holding `forward` (the model's forward on the worker thread).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mone.server import __version__
from mone.server.config import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from mone.server.http.access import AccessRecord


def provider_from_settings(settings: Settings) -> TracerProvider | None:
    """The tracer provider `otel_exporter` asks for (None when it is `none`).  The exporter reads the standard
    OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...)."""
    if settings.otel_exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter: SpanExporter
    if settings.otel_exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError(
                "otel_exporter=otlp needs the OTLP exporter: pip install 'mone-serve[tracing]'"
            ) from None
        exporter = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "mone-serve", "service.version": __version__}),
        sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """Draws a finished request's spans."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("mone-serve", __version__)
        self._trace = trace
        self._extract = propagate.extract

    def shutdown(self) -> None:
        self.provider.shutdown()  # exports what is buffered

    def request(
        self,
        name: str,
        carrier: Mapping[str, str],
        attributes: dict[str, Any],
        record: AccessRecord,
        start: float,
        end: float,
        status: int,
    ) -> None:
        """One request's spans; `start` and `end` are time.monotonic() values, as are the engine's times."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        offset = time.time_ns() - time.monotonic_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        attrs = {**attributes, "mone.request_id": record.id, "http.response.status_code": status}
        if record.budget_type is not None:
            attrs["mone.budget.type"] = record.budget_type
            attrs["mone.budget.value"] = float(record.budget_value or 0.0)
        if record.capacity is not None:
            attrs["mone.capacity"] = record.capacity
            attrs["mone.gflops"] = float(record.gflops or 0.0)
            attrs["mone.kind"] = record.kind or ""
            attrs["mone.samples"] = record.samples
        if record.error is not None:
            attrs["error.type"] = record.error
        root = self.tracer.start_span(
            name, context=self._extract(carrier), kind=SpanKind.SERVER, start_time=ns(start), attributes=attrs
        )
        if status >= 500:
            root.set_status(Status(StatusCode.ERROR, record.error))
        inside = self._trace.set_span_in_context(root)
        if record.arrival and record.decode_ms is not None:
            self._span("decode", inside, ns(record.arrival), ns(record.arrival + record.decode_ms / 1e3), {})
        for i, r in enumerate(record.results or ()):
            if not r.dequeued:
                continue
            sample = {"mone.sample": i}
            self._span("queue", inside, ns(r.enqueued), ns(r.dequeued), sample)
            batch_attrs: dict[str, Any] = {
                **sample,
                "mone.batch.size": r.batch_size,
                "mone.budget.type": r.budget.type,
                "mone.capacity": r.level.capacity,
                "mone.realised_capacity": r.output.realised,
                "mone.gflops": r.output.gflops,
            }
            first, last = r.forward
            batch = self.tracer.start_span(
                "batch", context=inside, start_time=ns(r.dequeued), attributes=batch_attrs
            )
            if first:
                forward_attrs = {"mone.batch.size": r.batch_size, "mone.frames": r.frames}
                in_batch = self._trace.set_span_in_context(batch)
                self._span("forward", in_batch, ns(first), ns(last), forward_attrs)
            batch.end(end_time=ns(max(last, r.dequeued)))
        root.end(end_time=ns(end))

    def _span(self, name: str, context: Any, start: int, end: int, attributes: dict[str, Any]) -> None:
        span: Span = self.tracer.start_span(name, context=context, start_time=start, attributes=attributes)
        span.end(end_time=max(start, end))
