"""OpenTelemetry: traces and metrics exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

Spans of one event, in one trace: the publisher's ``<subject> publish`` (``stanchion publish`` or
``publish_traced``; W3C trace context in the NATS headers) → FastStream's ``<subject> process`` (the stack's
decisions as its events and attributes) → one ``stanchion.attempt <candidate>`` per model call →
pydantic-ai's ``chat <model>`` (gen_ai attributes, tokens; no prompt or answer unless
``STANCHION_TRACE_CONTENT``) — and, beside the stack, ``<output subject> publish`` for the result.

The SDK reads the other standard variables itself: ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``.
Exemplars are off unless ``OTEL_METRICS_EXEMPLAR_FILTER`` asks for them. Export runs on background threads
with bounded queues: a collector that is down costs dropped spans, never a blocked or failed handler.
Without an endpoint nothing is configured and nothing is paid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from faststream import BaseMiddleware
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.opentelemetry.baggage import Baggage
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.sdk.metrics import (
    AlwaysOffExemplarFilter,
    AlwaysOnExemplarFilter,
    ExemplarFilter,
    MeterProvider,
    TraceBasedExemplarFilter,
)
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.settings import Settings

SHUTDOWN_TIMEOUT_MS = 5000
_EXEMPLAR_FILTERS: dict[str, type[ExemplarFilter]] = {
    "always_off": AlwaysOffExemplarFilter,
    "always_on": AlwaysOnExemplarFilter,
    "trace_based": TraceBasedExemplarFilter,
}


@dataclass(frozen=True)
class Telemetry:
    """The configured providers; ``shutdown()`` flushes what is left (bounded, even with the collector down)."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def shutdown(self) -> None:
        self.tracer_provider.force_flush(SHUTDOWN_TIMEOUT_MS)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(SHUTDOWN_TIMEOUT_MS)


_configured: Telemetry | None = None


def configure_telemetry(settings: Settings) -> Telemetry | None:
    """Install global tracer and meter providers exporting over OTLP/HTTP; ``None`` when no endpoint is set.

    Idempotent within a process. Call ``shutdown()`` on the result at exit to flush.
    """
    global _configured
    if not settings.otel_endpoint:
        return None
    if _configured is not None:
        return _configured
    # Exemplars (a sampled trace id on each measurement) only when asked for: the collector's Prometheus exporter
    # drops them unless OpenMetrics is on, and sampling one costs a share of every measurement.
    exemplars = os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER", "always_off").strip().lower()
    if exemplars not in _EXEMPLAR_FILTERS:
        raise ConfigError(
            f"OTEL_METRICS_EXEMPLAR_FILTER must be one of {', '.join(_EXEMPLAR_FILTERS)}, not {exemplars!r}"
        )
    resource = Resource.create({"service.name": settings.otel_service_name})
    base = settings.otel_endpoint.rstrip("/")
    # The endpoint may come from .env, which the exporters do not read: hand it over (the signal-specific
    # OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT, when set in the environment, still win).
    traces_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or f"{base}/v1/traces"
    metrics_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or f"{base}/v1/metrics"
    tracer_provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
    # OTEL_{TRACES,METRICS}_EXPORTER=none turns one signal off (e.g. metrics, for a traces-only backend).
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none":
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_endpoint)))
    readers = (
        []
        if os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() == "none"
        else [PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=metrics_endpoint))]
    )
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, exemplar_filter=_EXEMPLAR_FILTERS[exemplars]()
    )
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    _configured = Telemetry(tracer_provider, meter_provider)
    return _configured


def current_trace_id() -> str | None:
    """The trace id of the current span, as 32 hex digits, if there is a real one."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def trace_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus the current W3C trace context (``traceparent``, ``tracestate``, baggage)."""
    carrier = dict(headers or {})
    inject(carrier)
    return carrier


async def publish_traced(
    js: JetStreamContext, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
) -> PubAck:
    """Publish to JetStream inside a ``<subject> publish`` producer span whose context travels in the headers,
    so that the service's processing continues this trace. Without a configured tracer it is a plain publish.
    """
    tracer = trace.get_tracer("stanchion")
    attributes: dict[str, AttributeValue] = {
        SpanAttributes.MESSAGING_SYSTEM: "nats",
        SpanAttributes.MESSAGING_DESTINATION_NAME: subject,
        SpanAttributes.MESSAGING_OPERATION: "publish",
        SpanAttributes.MESSAGING_MESSAGE_PAYLOAD_SIZE_BYTES: len(payload),
    }
    with tracer.start_as_current_span(f"{subject} publish", kind=SpanKind.PRODUCER, attributes=attributes):
        return await js.publish(subject, payload, headers=trace_headers(headers))


class _Scope(BaseMiddleware[Any, Any]):
    """FastStream's telemetry for consuming; publishing from inside a handler parented to the handler's span.

    FastStream (0.7) publishes from a handler under an extra ``create`` span, or, from the handler's own
    middleware, re-injects the *incoming* message's context into the outgoing headers. Here a publish made
    while a span is current is a direct child of that span (the ``process`` span), and its headers carry the
    publish span, so that a consumer of the result continues from the publish that produced it. Everything else
    is FastStream's own middleware, delegated to through its public hooks.
    """

    def __init__(
        self, msg: Any, /, *, context: Any, inner: BaseMiddleware[Any, Any], telemetry: TelemetryMiddleware
    ) -> None:
        super().__init__(msg, context=context)
        self.inner = inner
        self.telemetry = telemetry

    async def on_receive(self) -> None:
        await self.inner.on_receive()

    async def after_processed(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> bool | None:
        return await self.inner.after_processed(exc_type, exc_val, exc_tb)

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        return await self.inner.consume_scope(call_next, msg)

    async def publish_scope(self, call_next: Any, cmd: Any) -> Any:
        parent = trace.get_current_span()
        if not parent.is_recording() or len(cmd.batch_bodies) > 1:
            return await self.inner.publish_scope(call_next, cmd)
        headers = cmd.headers
        baggage: Baggage | None = self.context.get_local("baggage")
        if baggage:
            headers.update(baggage.to_headers())
        destination = cmd.destination
        attributes: dict[str, AttributeValue] = {
            SpanAttributes.MESSAGING_SYSTEM: "nats",
            SpanAttributes.MESSAGING_DESTINATION_NAME: destination,
            SpanAttributes.MESSAGING_OPERATION: "publish",
        }
        if cmd.correlation_id:
            attributes[SpanAttributes.MESSAGING_MESSAGE_CONVERSATION_ID] = cmd.correlation_id
        metric_attributes: dict[str, AttributeValue] = {
            SpanAttributes.MESSAGING_SYSTEM: "nats",
            SpanAttributes.MESSAGING_DESTINATION_NAME: destination,
        }
        started = time.perf_counter()
        try:
            with self.telemetry.tracer.start_as_current_span(
                f"{destination} publish", kind=SpanKind.PRODUCER, attributes=attributes
            ):
                inject(headers, context=otel_context.get_current())
                cmd.headers = headers
                return await call_next(cmd)
        except Exception as exc:
            metric_attributes["error.type"] = type(exc).__name__
            raise
        finally:
            self.telemetry.publish_duration.record(time.perf_counter() - started, metric_attributes)


class TelemetryMiddleware:
    """A broker middleware: FastStream's ``NatsTelemetryMiddleware``, with the result publish parented to the
    processing span (see ``_Scope``). Uses the global tracer and meter providers."""

    def __init__(self) -> None:
        self.faststream = NatsTelemetryMiddleware()
        self.tracer = trace.get_tracer("stanchion")
        self.publish_duration = metrics.get_meter("stanchion").create_histogram(
            "messaging.publish.duration", unit="s", description="Measures the duration of publish operation."
        )

    def __call__(self, msg: Any | None, /, *, context: Any) -> BaseMiddleware[Any, Any]:
        return _Scope(msg, context=context, inner=self.faststream(msg, context=context), telemetry=self)
