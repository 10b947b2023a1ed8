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

Spans leave through ``RedactingSpanExporter``: a known secret (the settings' and every ``*_API_KEY``, ``*_TOKEN``,
``*_PASSWORD``, ``*_SECRET`` variable's value) or a key-shaped string in a span's name, attributes, events, links
or status — pydantic-ai's ``chat`` spans carry a provider's error text, which may quote the key — is exported as
``***``.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
from faststream import BaseMiddleware
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.opentelemetry.baggage import Baggage
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.attributes import BoundedAttributes
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
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import Link, SpanKind, Status
from opentelemetry.util.types import AnyValue, Attributes, AttributeValue

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.runtime.redact import Redactor, environment_secrets
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


log = structlog.get_logger("stanchion.telemetry")


class _Masking:
    """One span's pass through the redactor, counting the values it changed."""

    __slots__ = ("count", "redact")

    def __init__(self, redact: Callable[[str], str]) -> None:
        self.redact = redact
        self.count = 0

    def text(self, text: str) -> str:
        """``text`` masked: ``text`` itself when nothing in it is."""
        redacted = self.redact(text)
        if redacted is text or redacted == text:
            return text
        self.count += 1
        return redacted

    def value(self, value: AnyValue) -> AnyValue:
        """``value`` with every string in it masked: ``value`` itself when nothing in it is."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return self.mapping(value)
        if isinstance(value, Sequence) and not isinstance(value, bytes):
            items = tuple(self.value(item) for item in value)
            return value if all(map(operator.is_, items, value)) else items
        return value

    def mapping(self, attributes: Mapping[str, AnyValue]) -> Mapping[str, AnyValue]:
        """``attributes`` with their values masked: ``attributes`` itself when nothing in them is."""
        masked: dict[str, AnyValue] | None = None  # copied on the first change only: most spans have none
        for key, value in attributes.items():
            redacted = self.value(value)
            if redacted is not value:
                if masked is None:
                    masked = dict(attributes)
                masked[key] = redacted
        return attributes if masked is None else masked


def _bounded(attributes: Attributes, dropped: int) -> BoundedAttributes:
    # The exporter sends how many attributes the SDK dropped, which only BoundedAttributes carries.
    bounded = BoundedAttributes(attributes=attributes, immutable=True)
    bounded.dropped = dropped
    return bounded


class RedactingSpanExporter(SpanExporter):
    """A span exporter masking secrets in every span before handing it to ``inner`` (e.g. the OTLP exporter).

    ``redact`` (a ``Redactor``) is applied to the span's name, to every string in its attributes (inside
    sequences and mappings too), to its events' names and attributes, its links' attributes and its status
    description. A span with a masked value is exported as a new ``ReadableSpan`` carrying the masked values and
    everything else unchanged; a span with nothing to mask is passed as it is. Each masked value adds one to the
    ``stanchion.secrets.masked`` counter (``where="span"``); the first masked span logs one warning.
    """

    def __init__(
        self,
        inner: SpanExporter,
        redact: Callable[[str], str],
        *,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        """``meter_provider``: where the counter lives (default: the global one, also when installed later)."""
        self.inner = inner
        self.redact = redact
        self.masked = metrics.get_meter("stanchion", meter_provider=meter_provider).create_counter(
            "stanchion.secrets.masked", description="Secrets masked before leaving the process."
        )
        self._warned = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export ``spans`` through ``inner``, each masked."""
        return self.inner.export([self.masked_span(span) for span in spans])

    def shutdown(self) -> None:
        """Shut ``inner`` down."""
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush ``inner``."""
        return self.inner.force_flush(timeout_millis)

    def masked_span(self, span: ReadableSpan) -> ReadableSpan:
        """``span`` with every secret in it masked: ``span`` itself when it holds none."""
        masking = _Masking(self.redact)
        name = masking.text(span.name)
        attributes = masking.mapping(span.attributes or {})
        events = [self._event(masking, event) for event in span.events]
        links = [self._link(masking, link) for link in span.links]
        status = span.status
        if status.description:
            description = masking.text(status.description)
            if description is not status.description:
                status = Status(status.status_code, description)
        if not masking.count:
            return span
        self.masked.add(masking.count, {"where": "span"})
        with self._lock:
            warn, self._warned = not self._warned, True
        if warn:
            log.warning("secret_masked", where="span", span=name, note="later spans are masked without a line")
        # Likewise the counts of dropped events and links, which BoundedList carries.
        bounded_events = BoundedList[Event].from_seq(None, events)
        bounded_events.dropped = span.dropped_events
        bounded_links = BoundedList[Link].from_seq(None, links)
        bounded_links.dropped = span.dropped_links
        return ReadableSpan(
            name=name,
            context=span.get_span_context(),
            parent=span.parent,
            resource=span.resource,
            attributes=_bounded(attributes, span.dropped_attributes),
            events=bounded_events,
            links=bounded_links,
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    @staticmethod
    def _event(masking: _Masking, event: Event) -> Event:
        before = masking.count
        name = masking.text(event.name)
        attributes = event.attributes
        if attributes:
            masked = masking.mapping(attributes)
            if masked is not attributes:
                attributes = _bounded(masked, event.dropped_attributes)
        return Event(name, attributes, event.timestamp) if masking.count != before else event

    @staticmethod
    def _link(masking: _Masking, link: Link) -> Link:
        if not link.attributes:
            return link
        masked = masking.mapping(link.attributes)
        return link if masked is link.attributes else Link(link.context, _bounded(masked, link.dropped_attributes))


def secrets_redactor(settings: Settings, environ: Iterable[tuple[str, str]] | None = None) -> Redactor:
    """A redactor of the settings' secrets and of every secret-named environment variable's value."""
    named = environment_secrets(environ)
    return Redactor([*settings.secrets(), *named])


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
        exporter = RedactingSpanExporter(OTLPSpanExporter(endpoint=traces_endpoint), secrets_redactor(settings))
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
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
