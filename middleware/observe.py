"""Observe: one record, and optionally one span, per model call the stack makes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from stanchion.contracts import Decision, Usage
from stanchion.middleware.call import Call, Candidate
from stanchion.middleware.errors import describe, failure_kind
from stanchion.middleware.stack import Next

R = TypeVar("R")


@dataclass(frozen=True)
class AttemptRecord:
    """One model call as the stack saw it.

    ``outcome`` is ``"ok"``, ``"cancelled"`` (shutdown cancelled the call), or the failure's category
    (``transient``, ``permanent``, ``rejected``...).
    Usage and cost are those the call added (zero when the provider failed before reporting any).
    """

    candidate: str
    model: str
    route: str
    attempt: int
    delivery: int
    outcome: str
    latency_s: float
    usage: Usage
    cost_usd: float | None
    error: str | None = None


class AttemptRecorder(Protocol):
    def attempt_finished(self, call: Call, record: AttemptRecord) -> None: ...


def candidate_name(candidate: Candidate) -> str:
    return candidate.name


@dataclass(frozen=True)
class Observe:
    """Records each candidate attempt that reaches the model: its latency, outcome, usage and cost.

    Put it right inside the circuit breaker (a rejected call makes no model call, so it is not an
    attempt). Every recorder gets an ``AttemptRecord``; with a tracer, the attempt also gets its own
    span (``stanchion.attempt <candidate>``) carrying the decisions made inside it (e.g. a timeout) and,
    on failure, the error and its category.

    Args:
        recorders: Told about every attempt (logs, metrics, statistics).
        tracer: Opens a span per attempt; ``None`` for none.
        model_of: The model's name for a candidate (default: the candidate's name).
        redact: Applied to error texts.
    """

    recorders: Sequence[AttemptRecorder] = ()
    tracer: Tracer | None = None
    model_of: Callable[[Candidate], str] = candidate_name
    redact: Callable[[str], str] = str

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        if self.tracer is None:
            return await self._observe(call, call_next, None)
        name = call.candidate.name if call.candidate else "?"
        with self.tracer.start_as_current_span(
            f"stanchion.attempt {name}",
            kind=SpanKind.INTERNAL,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            return await self._observe(call, call_next, span)

    async def _observe(self, call: Call, call_next: Next[R], span: Span | None) -> R:
        usage_before, cost_before = call.usage, call.cost_usd
        decided = len(call.decisions)
        started = call.clock.now()
        outcome, error = "ok", None
        try:
            return await call_next(call)
        except Exception as exc:
            outcome, error = failure_kind(exc).value, self.redact(describe(exc))
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, error))
                span.set_attributes({"error.type": type(exc).__name__, "stanchion.failure": outcome})
                span.add_event("exception", {"exception.type": type(exc).__name__, "exception.message": error})
            raise
        except asyncio.CancelledError:
            # Shutdown (or a caller's timeout) cancelled the call: recorded as such, never as a success.
            outcome, error = "cancelled", "cancelled before an answer"
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, error))
                span.set_attribute("stanchion.failure", outcome)
            raise
        finally:
            candidate = call.candidate
            if span is not None or (self.recorders and candidate is not None):
                latency_s = call.clock.now() - started
                usage = call.usage - usage_before
                cost = None if call.cost_usd is None else call.cost_usd - (cost_before or 0.0)
                model = self.model_of(candidate) if candidate is not None else ""
                if span is not None:
                    self._annotate(span, call, call.decisions[decided:], usage, cost, model)
                if self.recorders and candidate is not None:
                    record = AttemptRecord(
                        candidate=candidate.name,
                        model=model,
                        route=call.route,
                        attempt=call.attempt or 1,
                        delivery=call.delivery,
                        outcome=outcome,
                        latency_s=latency_s,
                        usage=usage,
                        cost_usd=cost,
                        error=error,
                    )
                    for recorder in self.recorders:
                        recorder.attempt_finished(call, record)

    def _annotate(
        self, span: Span, call: Call, decisions: list[Decision], usage: Usage, cost: float | None, model: str
    ) -> None:
        for decision in decisions:
            span.add_event(decision.kind, {"detail": self.redact(decision.detail), "at_ms": decision.at_ms})
        if cost is not None:
            span.set_attribute("stanchion.cost_usd", cost)
        if call.slot_wait_s:
            span.set_attribute("stanchion.slot_wait_s", call.slot_wait_s)
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": usage.input_tokens,
                "gen_ai.usage.output_tokens": usage.output_tokens,
                "stanchion.candidate": call.candidate.name if call.candidate else "?",
                "stanchion.model": model,
                "stanchion.route": call.route,
                "stanchion.attempt": call.attempt or 1,
                "stanchion.delivery": call.delivery,
            }
        )
