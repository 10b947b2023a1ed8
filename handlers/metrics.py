"""OpenTelemetry metrics of the service, exported with the traces' OTLP settings.

Per candidate: ``stanchion.llm.duration`` (histogram, s), ``stanchion.llm.calls`` (by outcome),
``stanchion.llm.errors`` (by category), ``stanchion.llm.tokens`` (by type: input/output),
``stanchion.llm.cost`` (USD). Per event: ``stanchion.events`` (by subject and outcome),
``stanchion.retries`` and ``stanchion.fallbacks`` (by candidate), ``stanchion.dead_letters`` (by subject
and error type), ``stanchion.degraded`` (by subject). Breakers: ``stanchion.breaker.transitions`` (by
candidate, from, to) and ``stanchion.breaker.state`` (gauge: 0 closed, 1 half-open, 2 open).
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from middleware import AttemptRecord, Call

STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """Records the stack's attempts, events and breaker changes as OpenTelemetry instruments."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("stanchion")
        self.duration = meter.create_histogram(
            "stanchion.llm.duration", unit="s", description="Latency of one model call, per candidate."
        )
        self.calls = meter.create_counter("stanchion.llm.calls", description="Model calls, by outcome.")
        self.errors = meter.create_counter("stanchion.llm.errors", description="Failed model calls, by category.")
        self.tokens = meter.create_counter(
            "stanchion.llm.tokens", unit="{token}", description="Tokens, by type (input, output)."
        )
        self.cost = meter.create_counter("stanchion.llm.cost", unit="USD", description="Cost of the model calls.")
        self.events = meter.create_counter("stanchion.events", description="Events handled, by outcome.")
        self.retries = meter.create_counter("stanchion.retries", description="In-process retries, by candidate.")
        self.fallbacks = meter.create_counter(
            "stanchion.fallbacks", description="Moves to the next candidate, by the candidate that failed."
        )
        self.dead_letters = meter.create_counter("stanchion.dead_letters", description="Dead letters, by error type.")
        self.degraded = meter.create_counter("stanchion.degraded", description="Answers given by the heuristic.")
        self.transitions = meter.create_counter(
            "stanchion.breaker.transitions", description="Circuit breaker state changes."
        )
        self._states: dict[str, int] = {}
        meter.create_observable_gauge(
            "stanchion.breaker.state",
            callbacks=[self._observe_states],
            description="Circuit breaker state per candidate: 0 closed, 1 half-open, 2 open.",
        )

    def attempt_finished(self, call: Call, record: AttemptRecord) -> None:
        attributes = {"candidate": record.candidate, "model": record.model, "route": record.route}
        self.duration.record(record.latency_s, attributes)
        self.calls.add(1, {**attributes, "outcome": record.outcome})
        if record.outcome != "ok":
            self.errors.add(1, {**attributes, "category": record.outcome})
        if record.usage.input_tokens:
            self.tokens.add(record.usage.input_tokens, {**attributes, "type": "input"})
        if record.usage.output_tokens:
            self.tokens.add(record.usage.output_tokens, {**attributes, "type": "output"})
        if record.cost_usd:
            self.cost.add(record.cost_usd, attributes)

    def event_finished(
        self, *, outcome: str, subject: str, call: Call | None = None, error_type: str | None = None
    ) -> None:
        self.events.add(1, {"subject": subject, "outcome": outcome})
        if outcome == "dead_letter":
            self.dead_letters.add(1, {"subject": subject, "error_type": error_type or "unknown"})
        if call is None:
            return
        if call.degraded:
            self.degraded.add(1, {"subject": subject})
        for decision in call.decisions:
            if decision.kind == "retry":
                self.retries.add(1, {"candidate": decision.model or ""})
            elif decision.kind == "fallback":
                self.fallbacks.add(1, {"candidate": decision.model or ""})

    def breaker_changed(self, candidate: str, old: str, new: str) -> None:
        self.transitions.add(1, {"candidate": candidate, "from": old, "to": new})
        self._states[candidate] = STATE_VALUES.get(new, 0)

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, {"candidate": name}) for name, value in list(self._states.items())]
