"""Span redaction: known secrets never reach the span exporter, and each masking is counted."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer
from structlog.testing import capture_logs

from stanchion.handlers.observability.telemetry import RedactingSpanExporter, secrets_redactor
from stanchion.handlers.runtime.redact import Redactor
from stanchion.handlers.settings import Settings

SECRET = "hunter2-correct-horse"


class Pipeline:
    """A real tracer whose spans go through a ``RedactingSpanExporter`` into memory, with its counter readable;
    ``raw`` gets the same spans unmasked, to compare with."""

    def __init__(self) -> None:
        self.inner = InMemorySpanExporter()
        self.raw = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.exporter = RedactingSpanExporter(
            self.inner, Redactor([SECRET]), meter_provider=MeterProvider(metric_readers=[self.reader])
        )
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(SimpleSpanProcessor(self.raw))
        self.tracer: Tracer = self.provider.get_tracer("test", "1.2")

    def span(self) -> ReadableSpan:
        [span] = self.inner.get_finished_spans()
        return span

    def masked(self) -> list[tuple[dict[str, object], int | float]]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            (dict(point.attributes or {}), point.value)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "stanchion.secrets.masked"
            for point in metric.data.data_points
            if hasattr(point, "value")
        ]


@pytest.fixture
def pipeline() -> Pipeline:
    return Pipeline()


def test_a_secret_in_an_attribute_is_masked(pipeline: Pipeline) -> None:
    """A string attribute quoting a secret is exported with the secret replaced by ``***``."""
    with pipeline.tracer.start_as_current_span("chat gpt-4o", attributes={"error": f"401: key {SECRET} refused"}):
        pass
    assert dict(pipeline.span().attributes or {}) == {"error": "401: key *** refused"}


def test_a_secret_inside_a_list_attribute_is_masked(pipeline: Pipeline) -> None:
    """Each string of a sequence attribute is masked, the others kept in order."""
    with pipeline.tracer.start_as_current_span("chat", attributes={"errors": ["fine", f"Bearer {SECRET}"]}):
        pass
    assert dict(pipeline.span().attributes or {})["errors"] == ("fine", "Bearer ***")


def test_a_secret_in_an_event_is_masked(pipeline: Pipeline) -> None:
    """Event names and event attributes are masked; the event's timestamp is kept."""
    with pipeline.tracer.start_as_current_span("chat") as span:
        span.add_event(f"retry {SECRET}", {"detail": f"503 via {SECRET}", "attempt": 2}, timestamp=123)
    [event] = pipeline.span().events
    assert event.name == "retry ***"
    assert dict(event.attributes or {}) == {"detail": "503 via ***", "attempt": 2}
    assert event.timestamp == 123


def test_a_secret_in_the_status_description_is_masked(pipeline: Pipeline) -> None:
    """An ERROR status keeps its code and loses the secret from its description."""
    with pipeline.tracer.start_as_current_span("chat") as span:
        span.set_status(Status(StatusCode.ERROR, f"refused {SECRET}"))
    status = pipeline.span().status
    assert status.status_code is StatusCode.ERROR
    assert status.description == "refused ***"


def test_a_recorded_exception_is_masked(pipeline: Pipeline) -> None:
    """An exception recorded by ``record_exception`` (message and stack trace) and the status it sets are masked."""
    with pytest.raises(RuntimeError), pipeline.tracer.start_as_current_span("chat"):
        raise RuntimeError(f"provider said: bad key {SECRET}")
    span = pipeline.span()
    [event] = span.events
    attributes = dict(event.attributes or {})
    assert event.name == "exception"
    assert attributes["exception.message"] == "provider said: bad key ***"
    assert SECRET not in str(attributes["exception.stacktrace"])
    assert "***" in str(attributes["exception.stacktrace"])
    assert span.status.description == "RuntimeError: provider said: bad key ***"


def test_a_secret_in_a_link_attribute_is_masked(pipeline: Pipeline) -> None:
    """Link attributes are masked; the linked context is kept."""
    with pipeline.tracer.start_as_current_span("parent") as parent:
        linked = parent.get_span_context()
    pipeline.inner.clear()
    with pipeline.tracer.start_as_current_span("chat", links=[Link(linked, {"why": f"after {SECRET}"})]):
        pass
    [link] = pipeline.span().links
    assert link.context == linked
    assert dict(link.attributes or {}) == {"why": "after ***"}


def test_a_masked_span_keeps_everything_else(pipeline: Pipeline) -> None:
    """The rebuilt span keeps its context, parent, kind, times, resource, scope and the other values."""
    with (
        pipeline.tracer.start_as_current_span("process") as parent,
        pipeline.tracer.start_as_current_span(
            "chat", kind=SpanKind.CLIENT, attributes={"n": 7, "error": SECRET}
        ) as child,
    ):
        child.add_event("clean", {"n": 1})
    [span, _] = pipeline.inner.get_finished_spans()
    [raw, _] = pipeline.raw.get_finished_spans()
    assert span.get_span_context() == raw.get_span_context() == child.get_span_context()
    assert span.parent == raw.parent == parent.get_span_context()
    assert span.kind is SpanKind.CLIENT
    assert (span.start_time, span.end_time) == (raw.start_time, raw.end_time)
    assert span.resource is raw.resource
    assert span.instrumentation_scope == raw.instrumentation_scope
    assert (span.dropped_attributes, span.dropped_events, span.dropped_links) == (0, 0, 0)
    assert dict(span.attributes or {}) == {"n": 7, "error": "***"}
    assert [(event.name, dict(event.attributes or {})) for event in span.events] == [("clean", {"n": 1})]


def test_a_masked_span_keeps_the_counts_of_what_the_sdk_dropped() -> None:
    """The SDK's counts of dropped attributes, events and links, which the OTLP exporter sends, survive masking."""
    inner = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_attributes=1, max_events=1, max_links=1))
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(inner, Redactor([SECRET]))))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent") as parent:
        linked = parent.get_span_context()
    links = [Link(linked), Link(linked)]
    with tracer.start_as_current_span("chat", links=links, attributes={"a": 1, "error": SECRET}) as span:
        span.add_event("one")
        span.add_event("two", {"more": 1, "detail": SECRET})  # the SDK keeps the newest of each
    exported = inner.get_finished_spans()[1]
    assert dict(exported.attributes or {}) == {"error": "***"}
    assert [(event.name, dict(event.attributes or {})) for event in exported.events] == [("two", {"detail": "***"})]
    assert (exported.dropped_attributes, exported.dropped_events, exported.dropped_links) == (1, 1, 1)
    assert exported.events[0].dropped_attributes == 1


def test_a_span_without_secrets_is_exported_unchanged(pipeline: Pipeline) -> None:
    """A span with nothing to mask is handed on as the very same object, and nothing is counted or logged."""
    with capture_logs() as logs, pipeline.tracer.start_as_current_span("chat", attributes={"a": "b"}) as span:
        span.add_event("retry", {"detail": "503", "models": ["fast", "slow"]})
        span.set_status(Status(StatusCode.ERROR, "timed out"))
    [raw] = pipeline.raw.get_finished_spans()
    assert pipeline.exporter.masked_span(raw) is raw
    assert pipeline.span().to_json() == raw.to_json()
    assert pipeline.masked() == []
    assert logs == []


def test_each_masking_is_counted_and_only_the_first_masked_span_logs(pipeline: Pipeline) -> None:
    """Every masked value adds one to ``stanchion.secrets.masked`` (``where="span"``); one warning, first time only."""
    with capture_logs() as logs:
        with pipeline.tracer.start_as_current_span(f"first {SECRET}", attributes={"error": SECRET}):
            pass
        with pipeline.tracer.start_as_current_span("second") as span:
            span.add_event("retry", {"detail": SECRET})
    assert pipeline.masked() == [({"where": "span"}, 3)]
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning" and logs[0]["where"] == "span"
    assert SECRET not in str(logs)


def test_flush_and_shutdown_reach_the_inner_exporter(pipeline: Pipeline) -> None:
    """``force_flush`` and ``shutdown`` are the inner exporter's."""
    assert pipeline.exporter.force_flush(10) is True
    pipeline.exporter.shutdown()
    with pipeline.tracer.start_as_current_span("after"):
        pass
    assert pipeline.inner.get_finished_spans() == ()


def test_the_redactor_knows_the_settings_and_the_secret_named_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings' secrets and every ``*_API_KEY``/``*_TOKEN``/``*_PASSWORD``/``*_SECRET`` variable are masked."""
    settings = Settings(_env_file=None, OPENAI_API_KEY="openai-key-1234")
    environ = [("MY_TOKEN", "tok-5678"), ("DB_PASSWORD", "pw-9012"), ("X_SECRET", "shh-3456"), ("HOME", "/home/me")]
    redact = secrets_redactor(settings, environ)
    assert redact("openai-key-1234 tok-5678 pw-9012 shh-3456 /home/me") == "*** *** *** *** /home/me"
