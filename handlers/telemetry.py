"""OpenTelemetry: traces exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

Spans: FastStream's messaging spans (``<subject> process`` / ``publish``, with W3C trace context carried in
the message headers), the stack's ``stanchion.stack`` span with every decision as an event, and
pydantic-ai's ``gen_ai`` spans for each model request (without prompt or answer content).
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from handlers.settings import Settings


def configure_tracing(settings: Settings) -> TracerProvider | None:
    """Install a global tracer provider exporting to the OTLP endpoint; ``None`` when no endpoint is set.

    The exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables itself (endpoint, headers, timeout).
    Call ``shutdown()`` on the result at exit to flush.
    """
    if not settings.otel_endpoint:
        return None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # already configured in this process
        return current
    resource = Resource.create({"service.name": settings.otel_service_name})
    provider = TracerProvider(resource=resource)
    # The endpoint may come from .env, which the exporter does not read: hand it over (the signal-specific
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, when set in the environment, still wins).
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or settings.otel_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def current_trace_id() -> str | None:
    """The trace id of the current span, as 32 hex digits, if there is a real one."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
