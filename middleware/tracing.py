"""Tracing: one OpenTelemetry span around the stack, with every decision as a span event.

The decisions' data become the events' attributes: the route and its candidates, each retry's attempt,
failure category and wait, breaker states and rejections, fallback steps, the degraded answer, timeouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from stanchion.contracts import Decision
from stanchion.middleware.call import Call
from stanchion.middleware.errors import describe
from stanchion.middleware.stack import Next

R = TypeVar("R")


def _identity(text: str) -> str:
    return text


@dataclass(frozen=True)
class Tracing:
    """Opens a span for the call, sets ``call.trace_id``, and records what the stack decided.

    Put it outermost. Without an OpenTelemetry SDK configured the span is a no-op and ``trace_id``
    stays ``None``.

    Args:
        tracer: The tracer (default: the global provider's ``stanchion`` tracer).
        redact: Applied to every text put on the span (error messages may quote secrets).
        name: The span's name.
        annotate_current: Record on the span already current (e.g. the messaging ``process`` span of the
            message being handled) instead of opening one, when there is a recording one: one span less
            per event, and the attempts become direct children of the processing span.
    """

    tracer: Tracer | None = None
    redact: Callable[[str], str] = _identity
    name: str = "stanchion.stack"
    annotate_current: bool = False

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        current = trace.get_current_span()
        if self.annotate_current and current.is_recording():
            return await self._record(current, call, call_next)
        tracer = self.tracer or trace.get_tracer("stanchion")
        with tracer.start_as_current_span(self.name, record_exception=False, set_status_on_exception=False) as span:
            return await self._record(span, call, call_next)

    async def _record(self, span: Span, call: Call, call_next: Next[R]) -> R:
        context = span.get_span_context()
        if context.is_valid:
            call.trace_id = format(context.trace_id, "032x")
        try:
            result = await call_next(call)
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, self.redact(describe(exc))))
            raise
        finally:
            for decision in call.decisions:
                span.add_event(decision.kind, self._event_attributes(decision))
            span.set_attributes(
                {
                    "stanchion.route": call.route,
                    "stanchion.served_by": call.served_by or "",
                    "stanchion.degraded": call.degraded,
                    "stanchion.attempts": call.attempts,
                    "stanchion.delivery": call.delivery,
                    "gen_ai.usage.input_tokens": call.usage.input_tokens,
                    "gen_ai.usage.output_tokens": call.usage.output_tokens,
                }
            )
            if call.cost_usd is not None:
                span.set_attribute("stanchion.cost_usd", call.cost_usd)
            if call.deadline is not None:
                span.set_attribute("stanchion.deadline_ms", round((call.deadline - call.started_at) * 1000, 3))
        return result

    def _event_attributes(self, decision: Decision) -> dict[str, AttributeValue]:
        """The decision as span-event attributes: model, detail, time, and its data (scalars and lists of them)."""
        attributes: dict[str, AttributeValue] = {
            "model": decision.model or "",
            "detail": self.redact(decision.detail),
            "at_ms": decision.at_ms,
        }
        for key, value in decision.data.items():
            if isinstance(value, str):
                attributes[key] = self.redact(value)
            elif isinstance(value, bool | int | float):
                attributes[key] = value
            elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                attributes[key] = [self.redact(v) for v in value]
            elif value is not None:
                attributes[key] = self.redact(str(value))
        return attributes
