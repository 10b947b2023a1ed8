"""Tracing: one span per call, the trace id on the call, decisions as events, errors redacted."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from stanchion.contracts import Usage
from stanchion.middleware import Call, Tracing


def tracer() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(tracer=provider.get_tracer("test"), redact=lambda text: text.replace("sk-secret", "***")), exporter


async def test_a_call_becomes_one_span_with_its_decisions_as_events() -> None:
    """The span carries who served, attempts and tokens; each decision is an event; the call gets the trace id."""
    tracing, exporter = tracer()
    call = Call(event=None)

    async def served(call: Call) -> str:
        call.decide("route", "default", model="fast")
        call.decide("retry", "503 from sk-secret proxy", model="fast")
        call.served_by, call.attempts = "fast", 2
        call.add_usage(Usage(input_tokens=10, output_tokens=5, requests=2), 0.001)
        return "ok"

    assert await tracing(call, served) == "ok"
    [span] = exporter.get_finished_spans()
    assert call.trace_id == format(span.context.trace_id, "032x")
    assert span.name == "stanchion.stack"
    attributes = dict(span.attributes or {})
    assert attributes["stanchion.served_by"] == "fast"
    assert attributes["stanchion.attempts"] == 2
    assert attributes["gen_ai.usage.input_tokens"] == 10
    assert attributes["stanchion.cost_usd"] == 0.001
    assert [event.name for event in span.events] == ["route", "retry"]
    assert dict(span.events[1].attributes or {})["detail"] == "503 from *** proxy"


async def test_a_failure_marks_the_span_as_an_error_without_the_secret() -> None:
    """An error below sets the span's status to ERROR with a redacted description, and propagates."""
    tracing, exporter = tracer()

    async def failing(call: Call) -> str:
        raise RuntimeError("refused key sk-secret")

    with pytest.raises(RuntimeError):
        await tracing(Call(event=None), failing)
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert "sk-secret" not in (span.status.description or "")
    assert "***" in (span.status.description or "")


async def test_without_an_sdk_the_trace_id_stays_unset() -> None:
    """With the API's no-op tracer there is no real trace, so the call carries no trace id."""
    from opentelemetry.trace import NoOpTracerProvider

    call = Call(event=None)

    async def served(call: Call) -> str:
        return "ok"

    assert await Tracing(tracer=NoOpTracerProvider().get_tracer("x"))(call, served) == "ok"
    assert call.trace_id is None


async def test_annotate_current_records_on_the_span_already_open() -> None:
    """Inside a recording span (the messaging `process` span), the stack adds no span of its own; outside one,
    it still opens `stanchion.stack`."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(tracer=provider.get_tracer("test"), annotate_current=True)

    async def served(call: Call) -> str:
        call.decide("route", "default", model="fast")
        call.served_by = "fast"
        return "ok"

    call = Call(event=None)
    with provider.get_tracer("test").start_as_current_span("tasks.classify process") as process:
        assert await tracing(call, served) == "ok"
    [span] = exporter.get_finished_spans()
    assert span.name == "tasks.classify process"
    assert call.trace_id == format(process.get_span_context().trace_id, "032x")
    assert [event.name for event in span.events] == ["route"]
    assert dict(span.attributes or {})["stanchion.served_by"] == "fast"

    exporter.clear()
    assert await tracing(Call(event=None), served) == "ok"
    assert [s.name for s in exporter.get_finished_spans()] == ["stanchion.stack"]
