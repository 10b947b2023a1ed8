"""Traces exported over OTLP to a real receiver: one trace per event, from the publisher to the model request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nats
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider

from handlers.embedded import EmbeddedNats
from tests.conftest import Collector, service_env, start_service, stop_service, unique_settings, wait_for_consumer
from tests.fake_openai import FakeOpenAI
from tests.otlp_receiver import OtlpReceiver

SECRET = "sk-test-trace-0123456789abcdef"


async def test_an_event_is_one_trace_from_the_publisher_through_the_stack_to_the_model(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, `stanchion run` exports the messaging span, the stack span (with
    its decisions as events) and the gen_ai spans in the publisher's trace, whose id the envelope carries; a
    dead letter carries its trace id too; no span holds the API key."""
    provider = fake_openai()
    provider.set(script=["503"])  # the first request fails: a retry decision shows on the span
    settings = unique_settings(nats_server.url)
    with OtlpReceiver() as receiver:
        env = service_env(
            settings,
            OPENAI_API_KEY=SECRET,
            OPENAI_BASE_URL=provider.base_url,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_SERVICE_NAME="stanchion-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        service = start_service(env, tmp_path)
        client = await nats.connect(nats_server.url)
        collector = Collector()
        publisher_trace = TracerProvider().get_tracer("test-publisher")
        try:
            await client.subscribe(settings.output_subject, cb=collector.on_result)
            await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
            await wait_for_consumer(client, settings, service)
            with publisher_trace.start_as_current_span("publish task") as span:
                headers: dict[str, str] = {}
                inject(headers)
                publisher_trace_id = format(span.get_span_context().trace_id, "032x")
                event = json.dumps({"id": "traced-1", "text": "the export crashes"}).encode()
                await client.jetstream().publish(settings.input_subject, event, headers=headers)
            await client.jetstream().publish(settings.input_subject, b"{broken")
            await collector.wait_for(results=1, dead=1, timeout=30)
        finally:
            await client.close()
            code = stop_service(service)
    assert code == 0
    [result] = collector.results
    [dead] = collector.dead
    assert result["trace_id"] == publisher_trace_id
    assert dead["trace_id"] and len(dead["trace_id"]) == 32
    spans = [s for s in receiver.snapshot() if s.trace_id == publisher_trace_id]
    names = {s.name for s in spans}
    assert f"{settings.input_subject} process" in names
    assert "stanchion.stack" in names
    assert any(name.startswith("chat") for name in names), names
    assert {s.service for s in spans} == {"stanchion-test"}
    [stack] = [s for s in spans if s.name == "stanchion.stack"]
    assert stack.attributes["stanchion.served_by"] == "fast"
    assert stack.attributes["stanchion.attempts"] == 2
    assert [name for name, _ in stack.events][:2] == ["route", "retry"]
    assert any(s.trace_id == dead["trace_id"] for s in receiver.snapshot())
    assert all(SECRET.encode() not in body for body in receiver.raw)
