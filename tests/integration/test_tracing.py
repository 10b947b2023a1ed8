"""Traces and metrics exported over OTLP to a real receiver: one trace per event, from `stanchion publish` to the
result publish; a collector that is down costs nothing but the spans."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.msg import Msg

from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import (
    STANCHION,
    Collector,
    service_env,
    start_service,
    stop_service,
    unique_settings,
    wait_for_consumer,
)
from tests.fake_openai import FakeOpenAI
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

SECRET = "sk-test-trace-0123456789abcdef"


def _wait_for_spans(
    receiver: OtlpReceiver, trace_id: str, names: set[str], timeout: float = 15.0
) -> list[ReceivedSpan]:
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in receiver.snapshot() if s.trace_id == trace_id]
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


async def test_an_event_is_one_trace_from_stanchion_publish_to_the_result_publish(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """publish → process (the stack's decisions as events) → one attempt span per model call (the failed one with
    its error) → gen_ai chat span, and the result publish under the process span: one trace, whose id the envelope
    carries."""
    provider = fake_openai()
    provider.set(script=["503"])  # the first model call fails, the retry succeeds
    settings = unique_settings(nats_server.url)
    with OtlpReceiver() as receiver:
        env = service_env(
            settings,
            OPENAI_API_KEY=SECRET,
            OPENAI_BASE_URL=provider.base_url,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_SERVICE_NAME="stanchion-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_METRIC_EXPORT_INTERVAL="300",
        )
        service = start_service(env, tmp_path)
        client = await nats.connect(nats_server.url)
        collector = Collector()
        result_headers: list[dict[str, str]] = []

        async def on_result(msg: Msg) -> None:
            result_headers.append(dict(msg.headers or {}))
            await collector.on_result(msg)

        try:
            await client.subscribe(settings.output_subject, cb=on_result)
            await wait_for_consumer(client, settings, service)
            event = json.dumps({"id": "traced-1", "text": "the export crashes"})
            published = await asyncio.to_thread(
                subprocess.run,
                [STANCHION, "publish", settings.input_subject, event],
                env={**env, "OTEL_SERVICE_NAME": "publisher"},
                capture_output=True,
                timeout=60,
            )
            assert published.returncode == 0, published.stderr.decode()
            await collector.wait_for(results=1, timeout=30)
            [result] = collector.results
            trace_id = result["trace_id"]
            assert trace_id and len(trace_id) == 32
            input_subject, output_subject = settings.input_subject, settings.output_subject
            spans = _wait_for_spans(
                receiver, trace_id, {f"{input_subject} publish", f"{output_subject} publish", "stanchion.attempt fast"}
            )
            await asyncio.sleep(1.0)  # a metrics export or two
        finally:
            await client.close()
            code = stop_service(service)
    assert code == 0
    by_id = {s.span_id: s for s in spans}

    def only(name: str) -> ReceivedSpan:
        found = [s for s in spans if s.name == name]
        assert len(found) == 1, (name, sorted(s.name for s in spans))
        return found[0]

    def children(parent: ReceivedSpan, prefix: str) -> list[ReceivedSpan]:
        return [s for s in spans if s.parent_span_id == parent.span_id and s.name.startswith(prefix)]

    publish = only(f"{settings.input_subject} publish")
    assert publish.service == "publisher" and publish.parent_span_id == ""  # the trace starts at the publisher
    process = only(f"{settings.input_subject} process")
    assert process.parent_span_id == publish.span_id and process.service == "stanchion-test"
    # The stack records on the processing span: its decisions as events, its outcome as attributes.
    assert not any(s.name == "stanchion.stack" for s in spans)
    decisions = [name for name, _ in process.events]
    assert decisions[:2] == ["route", "retry"]
    route, retry = dict(process.events)["route"], dict(process.events)["retry"]
    assert route["reason"] == "no rule matched: default route" and route["candidates"]
    assert retry["failure"] == "transient" and retry["attempt"] == 1 and retry["wait_s"] >= 0
    assert process.attributes["stanchion.attempts"] == 2 and process.attributes["stanchion.served_by"] == "fast"
    assert process.attributes["stanchion.route"] == "default" and process.attributes["stanchion.deadline_ms"] > 0
    failed, succeeded = children(process, "stanchion.attempt fast")
    assert failed.attributes["stanchion.failure"] == "transient"
    assert "503" in dict(failed.events)["exception"]["exception.message"]
    assert failed.attributes["stanchion.attempt"] == 1 and succeeded.attributes["stanchion.attempt"] == 2
    assert "stanchion.failure" not in succeeded.attributes
    [chat] = children(succeeded, "chat")
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0 and chat.attributes["gen_ai.request.model"]
    # Content is off by default: the message structure is there, the prompt's text is not.
    assert '"type":"text"' in chat.attributes["gen_ai.input.messages"]
    assert all(b"the export crashes" not in body for body in receiver.raw)
    result_publish = only(f"{settings.output_subject} publish")
    assert result_publish.parent_span_id == process.span_id  # a child of the processing span, not of a stray span
    # A consumer of the result continues the trace from the result publish.
    assert result_headers[0]["traceparent"].split("-")[1:3] == [trace_id, result_publish.span_id]
    assert all(s.parent_span_id == "" or s.parent_span_id in by_id for s in spans)  # nothing parented outside
    # Metrics went out with the same OTLP settings.
    calls = receiver.metric_points("stanchion.llm.calls")
    assert {(p["candidate"], p["outcome"]) for p, _ in calls} >= {("fast", "ok"), ("fast", "transient")}
    assert any(p.get("type") == "input" and v > 0 for p, v in receiver.metric_points("stanchion.llm.tokens"))
    assert receiver.metric_points("stanchion.llm.duration")
    assert all(SECRET.encode() not in body for body in receiver.raw)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_with_the_collector_down_events_are_still_answered(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """Tracing and metrics point at a port nobody listens on: every event is answered by the model, no error
    reaches the handler, and the service still stops promptly."""
    provider = fake_openai()
    settings = unique_settings(nats_server.url)
    env = service_env(
        settings,
        OPENAI_API_KEY=SECRET,
        OPENAI_BASE_URL=provider.base_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        OTEL_BSP_SCHEDULE_DELAY="50",
        OTEL_METRIC_EXPORT_INTERVAL="200",
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
    )
    service = start_service(env, tmp_path)
    client = await nats.connect(nats_server.url)
    collector = Collector()
    try:
        await client.subscribe(settings.output_subject, cb=collector.on_result)
        await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
        await wait_for_consumer(client, settings, service)
        for i in range(10):
            event = {"id": f"dark-{i}", "text": f"the export crashes {i}"}
            await client.jetstream().publish(settings.input_subject, json.dumps(event).encode())
            await asyncio.sleep(0.1)  # spread over several failed exports
        await collector.wait_for(results=10, timeout=30)
    finally:
        await client.close()
        started = time.monotonic()
        code = stop_service(service)
        stopped_in = time.monotonic() - started
    assert code == 0
    assert stopped_in < 20
    assert collector.dead == []
    assert sorted(r["event_id"] for r in collector.results) == [f"dark-{i}" for i in range(10)]
    assert {r["model"] for r in collector.results} == {"fast"} and not any(r["degraded"] for r in collector.results)
    assert all(r["trace_id"] for r in collector.results)  # traced all the same, just not delivered
    log = (tmp_path / "service.log").read_text()
    assert "handling failed" not in log
