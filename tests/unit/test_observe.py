"""Observe: one record (and span) per model call, inside Retry and the breaker, with usage, cost and outcome."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from tenacity import stop_after_attempt, wait_fixed

from stanchion.contracts import Usage
from stanchion.handlers.observability.logs import QuietPullTimeouts, escape_controls
from stanchion.middleware import (
    AttemptRecord,
    Call,
    Candidate,
    CircuitBreaker,
    FakeClock,
    Fallback,
    InvalidOutput,
    Observe,
    Retry,
    RetryPolicy,
    Route,
    RouteSpec,
    Stack,
    Terminal,
)
from tests.unit.fakes import server_error, unauthorized


class Records:
    def __init__(self) -> None:
        self.records: list[AttemptRecord] = []

    def attempt_finished(self, call: Call, record: AttemptRecord) -> None:
        self.records.append(record)


def stack_with(observe: Observe, terminal: Terminal[str], clock: FakeClock) -> Stack[str]:
    routes = {"default": RouteSpec((Candidate("fast"), Candidate("backup")), heuristic=False)}
    return Stack(
        [
            Route(routes),
            Fallback(),
            Retry(RetryPolicy(stop=stop_after_attempt(2), wait=wait_fixed(0.5))),
            CircuitBreaker(clock=clock),
            observe,
        ],
        terminal,
    )


async def test_each_model_call_is_one_record_with_its_own_usage_latency_and_outcome() -> None:
    """fast: 503 then 401 (retried once, then permanent); backup answers. Three records, in order, each with
    the usage and cost its call added, its latency on the call's clock, and its outcome category."""
    clock = FakeClock()
    records = Records()
    outcomes: dict[str, list[str | Exception]] = {"fast": [server_error(), unauthorized()], "backup": ["answer"]}

    async def terminal(call: Call) -> str:
        assert call.candidate is not None
        await clock.sleep(0.25)
        outcome = outcomes[call.candidate.name].pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        call.add_usage(Usage(input_tokens=100, output_tokens=10, requests=1), 0.002)
        return outcome

    observe = Observe(recorders=[records], model_of=lambda c: f"model-of-{c.name}")
    call = Call(event=None, clock=clock)
    call.add_usage(Usage(input_tokens=7, output_tokens=7, requests=1), 0.5)  # spent before: not this call's
    assert await stack_with(observe, terminal, clock)(call) == "answer"

    assert [(r.candidate, r.model, r.attempt, r.outcome) for r in records.records] == [
        ("fast", "model-of-fast", 1, "transient"),
        ("fast", "model-of-fast", 2, "permanent"),
        ("backup", "model-of-backup", 1, "ok"),
    ]
    assert [r.latency_s for r in records.records] == [0.25, 0.25, 0.25]
    assert [r.usage.input_tokens for r in records.records] == [0, 0, 100]
    assert records.records[2].cost_usd == pytest.approx(0.002)
    assert records.records[0].error is not None and "503" in records.records[0].error
    assert records.records[2].error is None


async def test_a_cancelled_call_is_recorded_as_cancelled_not_ok() -> None:
    """Shutdown cancelling a model call mid-flight: its record says ``cancelled``, and the cancellation goes on."""
    records = Records()
    started = asyncio.Event()

    async def terminal(call: Call) -> str:
        started.set()
        await asyncio.sleep(60)
        return "never"

    call = Call(event=None)
    call.candidate = Candidate("fast")
    task = asyncio.create_task(Observe(recorders=[records])(call, terminal))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [record] = records.records
    assert (record.candidate, record.outcome) == ("fast", "cancelled")


async def test_a_rejected_call_is_no_model_call() -> None:
    """With the breaker open, the candidate is never called, and nothing is recorded for it."""
    clock = FakeClock()
    records = Records()

    async def failing(call: Call) -> str:
        raise server_error()

    breaker = CircuitBreaker(clock=clock)
    await breaker.force_open("fast")
    observe = Observe(recorders=[records])
    stack: Stack[str] = Stack([breaker, observe], failing)
    call = Call(event=None, clock=clock)
    call.candidate = Candidate("fast")
    with pytest.raises(Exception, match="open"):
        await stack(call)
    assert records.records == []


async def test_with_a_tracer_each_attempt_is_a_span_the_failed_one_with_its_redacted_error() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = FakeClock()
    outcomes: list[object] = [RuntimeError("refused sk-secret-key"), "answer"]

    async def terminal(call: Call) -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)

    observe = Observe(tracer=provider.get_tracer("t"), redact=lambda text: text.replace("sk-secret-key", "***"))
    call = Call(event=None, clock=clock)
    call.candidate = Candidate("fast")
    with pytest.raises(RuntimeError):
        await observe(call, terminal)
    assert await observe(call, terminal) == "answer"
    failed, ok = exporter.get_finished_spans()
    assert failed.name == ok.name == "stanchion.attempt fast"
    assert failed.status.status_code is StatusCode.ERROR
    assert "sk-secret-key" not in (failed.status.description or "") and "***" in (failed.status.description or "")
    assert dict(failed.attributes or {})["stanchion.failure"] == "permanent"  # an unknown error is not retried
    assert [e.name for e in failed.events] == ["exception"]
    assert ok.status.status_code is StatusCode.UNSET
    assert "stanchion.failure" not in dict(ok.attributes or {})


def test_an_empty_pull_is_not_logged_as_an_error() -> None:
    """FastStream's supervisor line for a pull's asyncio timeout is dropped; any other task failure is kept."""

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        message = "Task-7 raised an exception, retrying...\nIf this behavior causes issues, ..."
        return logging.LogRecord("faststream", logging.ERROR, __file__, 1, message, None, info)

    quiet = QuietPullTimeouts()
    assert not quiet.filter(record(TimeoutError()))
    assert quiet.filter(record(RuntimeError("real failure")))


def test_control_characters_are_escaped_in_console_log_lines() -> None:
    """A NUL or an escape sequence from an event reaches the console as text, not as raw bytes."""
    event = escape_controls(None, "info", {"event": "poison message", "reason": "id nul\x00 and \x1b[31m red"})
    assert event["reason"] == "id nul\\x00 and \\x1b[31m red"
    assert escape_controls(None, "info", {"reason": "line\tand\nnewline"})["reason"] == "line\tand\nnewline"


async def test_a_failed_attempt_that_received_responses_carries_their_tokens_and_cost_on_its_span_and_record() -> None:
    """Output still invalid after its retries: the attempt failed, but the two responses were paid for; the span's
    gen_ai.usage.* and stanchion.cost_usd, and the record, say so."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    records = Records()

    async def invalid_twice(call: Call) -> str:
        call.add_usage(Usage(input_tokens=120, output_tokens=40, requests=2), 0.0009)
        raise InvalidOutput("fast", [{"field": "priority", "message": "Input should be less than or equal to 5"}], 1)

    call = Call(event=None, clock=FakeClock())
    call.candidate = Candidate("fast")
    with pytest.raises(InvalidOutput):
        await Observe(recorders=[records], tracer=provider.get_tracer("t"))(call, invalid_twice)
    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (120, 40)
    assert attributes["stanchion.cost_usd"] == pytest.approx(0.0009)
    assert attributes["stanchion.failure"] == "permanent"
    [record] = records.records
    assert record.usage.requests == 2 and record.cost_usd == pytest.approx(0.0009) and record.outcome == "permanent"
