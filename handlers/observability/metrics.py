"""OpenTelemetry metrics of the service, exported with the traces' OTLP settings.

Every figure carries the ``handler`` it belongs to. Per candidate: ``stanchion.llm.duration`` (histogram, s),
``stanchion.llm.calls`` (by outcome), ``stanchion.llm.errors`` (by category), ``stanchion.llm.tokens``
(by type: input/output), ``stanchion.llm.cost`` (USD), ``stanchion.retries``, ``stanchion.fallbacks``.
Per input subject:
``stanchion.events`` (by outcome), ``stanchion.dead_letters`` (by error type), ``stanchion.degraded``.
Breakers: ``stanchion.breaker.transitions`` (by candidate, from, to) and ``stanchion.breaker.state``
(gauge: 0 closed, 1 half-open, 2 open).

The counters are observed at export time from the service's ``ServiceStats`` — the same figures
``stanchion report`` shows — so a handled event costs one histogram record per model call, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from stanchion.handlers.observability.stats import ServiceStats
from stanchion.middleware import AttemptRecord, Call

STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}

Observer = Callable[[CallbackOptions], Iterable[Observation]]


@dataclass(frozen=True)
class _Handler:
    name: str
    subject: str
    stats: ServiceStats


class Metrics:
    """OpenTelemetry instruments over the statistics of every handler of a process (``add`` one), with a
    ``handler`` attribute on each figure; ``recorder(name)`` is the ``AttemptRecorder`` of one handler."""

    def __init__(self, provider: MeterProvider) -> None:
        self.handlers: list[_Handler] = []
        meter = provider.get_meter("stanchion")
        self.duration = meter.create_histogram(
            "stanchion.llm.duration", unit="s", description="Latency of one model call, per candidate."
        )
        self.transitions = meter.create_counter(
            "stanchion.breaker.transitions", description="Circuit breaker state changes."
        )
        self._states: dict[tuple[str, str], int] = {}
        counters: list[tuple[str, str, str, Observer]] = [
            ("stanchion.llm.calls", "{call}", "Model calls, by outcome.", self._calls),
            ("stanchion.llm.errors", "{call}", "Failed model calls, by category.", self._errors),
            ("stanchion.llm.tokens", "{token}", "Tokens, by type (input, output).", self._tokens),
            ("stanchion.llm.cost", "USD", "Cost of the model calls.", self._cost),
            ("stanchion.retries", "{retry}", "In-process retries, by candidate.", self._retries),
            ("stanchion.fallbacks", "{fallback}", "Moves past a candidate that failed.", self._fallbacks),
            ("stanchion.events", "{event}", "Events handled, by outcome.", self._events),
            ("stanchion.dead_letters", "{event}", "Dead letters, by error type.", self._dead_letters),
            ("stanchion.degraded", "{event}", "Answers given by the heuristic.", self._degraded),
        ]
        for name, unit, description, callback in counters:
            meter.create_observable_counter(name, callbacks=[callback], unit=unit, description=description)
        meter.create_observable_gauge(
            "stanchion.breaker.state",
            callbacks=[self._observe_states],
            description="Circuit breaker state per candidate: 0 closed, 1 half-open, 2 open.",
        )

    def add(self, handler: str, subject: str, stats: ServiceStats) -> _Recorder:
        """Observe one handler's statistics; returns its recorder of model-call latencies."""
        self.handlers.append(_Handler(handler, subject, stats))
        return _Recorder(self, handler)

    def breaker_changed(self, handler: str, candidate: str, old: str, new: str) -> None:
        self.transitions.add(1, {"handler": handler, "candidate": candidate, "from": old, "to": new})
        self._states[(handler, candidate)] = STATE_VALUES.get(new, 0)

    # -- observed at export time ------------------------------------------------------------------

    def _calls(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for name, model in list(h.stats.models.items()):
                attributes = {"handler": h.name, "candidate": name, "model": model.model}
                yield Observation(model.ok, {**attributes, "outcome": "ok"})
                for category, count in list(model.errors.items()):
                    yield Observation(count, {**attributes, "outcome": category})

    def _errors(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for name, model in list(h.stats.models.items()):
                for category, count in list(model.errors.items()):
                    attributes = {"handler": h.name, "candidate": name, "model": model.model, "category": category}
                    yield Observation(count, attributes)

    def _tokens(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for name, model in list(h.stats.models.items()):
                attributes = {"handler": h.name, "candidate": name, "model": model.model}
                yield Observation(model.input_tokens, {**attributes, "type": "input"})
                yield Observation(model.output_tokens, {**attributes, "type": "output"})

    def _cost(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for name, model in list(h.stats.models.items()):
                yield Observation(model.cost_usd, {"handler": h.name, "candidate": name, "model": model.model})

    def _retries(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for name, count in list(h.stats.retries_by_candidate.items()):
                yield Observation(count, {"handler": h.name, "candidate": name})

    def _fallbacks(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for name, count in list(h.stats.fallbacks_by_candidate.items()):
                yield Observation(count, {"handler": h.name, "candidate": name})

    def _events(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            stats = h.stats
            outcomes = {
                "answered": stats.answered,
                "stored": stats.from_store,
                "redelivered": stats.redelivered,
                "dead_letter": sum(stats.dead_letters.values()),
            }
            for kind, count in outcomes.items():
                yield Observation(count, {"handler": h.name, "subject": h.subject, "outcome": kind})

    def _dead_letters(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            for kind, count in list(h.stats.dead_letters.items()):
                yield Observation(count, {"handler": h.name, "subject": h.subject, "error_type": kind})

    def _degraded(self, options: CallbackOptions) -> Iterable[Observation]:
        for h in list(self.handlers):
            yield Observation(h.stats.degraded, {"handler": h.name, "subject": h.subject})

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(value, {"handler": handler, "candidate": name})
            for (handler, name), value in list(self._states.items())
        ]


@dataclass(frozen=True)
class _Recorder:
    """One handler's ``AttemptRecorder``: model-call latencies into the shared histogram."""

    metrics: Metrics
    handler: str

    def attempt_finished(self, call: Call, record: AttemptRecord) -> None:
        attributes = {"handler": self.handler, "candidate": record.candidate, "model": record.model}
        self.metrics.duration.record(record.latency_s, {**attributes, "outcome": record.outcome})
