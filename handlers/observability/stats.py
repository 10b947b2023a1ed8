"""Rolling statistics of one service process, for ``stanchion report``: small, bounded and mergeable.

Counters only grow; latencies go into log-bucketed histograms (5 % wide buckets), so the statistics
of several replicas merge exactly and the percentiles of the merge are as good as each replica's.
Memory is bounded by the number of candidates, dead-letter types and buckets, not by traffic.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from stanchion.middleware import AttemptRecord, Call

_GROWTH = 1.05
_LOG_GROWTH = math.log(_GROWTH)
_MIN_MS = 0.01
_MAX_MS = 3_600_000.0


@dataclass
class Histogram:
    """Latencies in milliseconds, in buckets ``(1.05^(i-1), 1.05^i]``; percentiles within 5 %."""

    buckets: Counter[int] = field(default_factory=Counter)
    count: int = 0
    sum_ms: float = 0.0

    def add(self, ms: float) -> None:
        clamped = min(max(ms, _MIN_MS), _MAX_MS)
        self.buckets[math.ceil(math.log(clamped) / _LOG_GROWTH)] += 1
        self.count += 1
        self.sum_ms += ms

    def percentile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (0 < q ≤ 1); ``None`` when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return float(_GROWTH**index)
        return None  # pragma: no cover - the loop always reaches rank

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.sum_ms += other.sum_ms

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _HISTOGRAM.dump_python(self, mode="json")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        return _HISTOGRAM.validate_python(data)


@dataclass
class ModelStats:
    """One candidate's model calls."""

    model: str = ""
    calls: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    priced_calls: int = 0
    failed_input_tokens: int = 0
    """Tokens of calls that failed (e.g. output still invalid after its retries): spent all the same."""
    failed_output_tokens: int = 0
    failed_cost_usd: float = 0.0

    def merge(self, other: ModelStats) -> None:
        self.model = self.model or other.model
        self.calls += other.calls
        self.ok += other.ok
        self.errors.update(other.errors)
        self.latency.merge(other.latency)
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd
        self.priced_calls += other.priced_calls
        self.failed_input_tokens += other.failed_input_tokens
        self.failed_output_tokens += other.failed_output_tokens
        self.failed_cost_usd += other.failed_cost_usd


@dataclass
class ServiceStats:
    """Everything one process counted since it started; ``merge`` adds another replica's.

    Events are counted when their outcome is decided: ``answered`` (by a model or, ``degraded``, by the
    heuristic), ``dead_letters`` by error type, ``redelivered`` (nak'ed to be tried later).
    """

    replica: str = ""
    handler: str = ""
    """The handler's name; its replicas share it (and its durable)."""
    subject: str = ""
    """The handler's input subject."""
    durable: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    events: int = 0
    """Outcomes decided: a message redelivered three times then answered counts four."""
    answered: int = 0
    degraded: int = 0
    from_store: int = 0
    redelivered: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    fallbacks: int = 0
    fell_back: int = 0
    latency: Histogram = field(default_factory=Histogram)
    models: dict[str, ModelStats] = field(default_factory=dict)
    breakers: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    retries_by_candidate: Annotated[Counter[str], Field(exclude=True)] = field(default_factory=Counter)
    """Per candidate, for the metrics (not sent to the report)."""
    fallbacks_by_candidate: Annotated[Counter[str], Field(exclude=True)] = field(default_factory=Counter)

    @classmethod
    def for_this_process(
        cls, replica: str = "", *, handler: str = "", subject: str = "", durable: str = ""
    ) -> ServiceStats:
        return cls(
            replica=replica,
            handler=handler,
            subject=subject,
            durable=durable,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )

    # -- recording --------------------------------------------------------------------------

    def attempt_finished(self, call: Call, record: AttemptRecord) -> None:
        stats = self.models.get(record.candidate)
        if stats is None:
            stats = self.models[record.candidate] = ModelStats(model=record.model)
        stats.calls += 1
        if record.outcome == "ok":
            stats.ok += 1
        else:
            stats.errors[record.outcome] += 1
        stats.latency.add(record.latency_s * 1000)
        stats.input_tokens += record.usage.input_tokens
        stats.output_tokens += record.usage.output_tokens
        if record.cost_usd is not None:
            stats.cost_usd += record.cost_usd
            stats.priced_calls += 1
        if record.outcome != "ok":
            stats.failed_input_tokens += record.usage.input_tokens
            stats.failed_output_tokens += record.usage.output_tokens
            stats.failed_cost_usd += record.cost_usd or 0.0

    def event_finished(
        self,
        *,
        outcome: str,
        latency_s: float,
        call: Call | None = None,
        error_type: str | None = None,
    ) -> None:
        """``outcome``: answered, stored, dead_letter or redelivered."""
        self.events += 1
        if outcome == "answered":
            self.answered += 1
            self.latency.add(latency_s * 1000)
            if call is not None and call.degraded:
                self.degraded += 1
        elif outcome == "stored":
            self.from_store += 1
        elif outcome == "dead_letter":
            self.dead_letters[error_type or "unknown"] += 1
        else:
            self.redelivered += 1
        if call is not None:
            fallbacks = 0
            for decision in call.decisions:
                if decision.kind == "retry":
                    self.retries += 1
                    self.retries_by_candidate[decision.model or ""] += 1
                elif decision.kind == "fallback":
                    fallbacks += 1
                    self.fallbacks_by_candidate[decision.model or ""] += 1
            self.fallbacks += fallbacks
            self.fell_back += fallbacks > 0

    def breaker_changed(self, candidate: str, state: str) -> None:
        self.breakers[candidate] = state

    # -- reading ------------------------------------------------------------------------------

    @property
    def model_calls(self) -> int:
        return sum(m.calls for m in self.models.values())

    @property
    def cost_usd(self) -> float:
        return sum(m.cost_usd for m in self.models.values())

    @property
    def failed_cost_usd(self) -> float:
        """The part of ``cost_usd`` spent on calls that failed."""
        return sum(m.failed_cost_usd for m in self.models.values())

    def merge(self, other: ServiceStats) -> None:
        """Add another replica's figures (breaker states are per replica: the worst one is kept)."""
        self.events += other.events
        self.answered += other.answered
        self.degraded += other.degraded
        self.from_store += other.from_store
        self.redelivered += other.redelivered
        self.dead_letters.update(other.dead_letters)
        self.retries += other.retries
        self.fallbacks += other.fallbacks
        self.fell_back += other.fell_back
        self.latency.merge(other.latency)
        for name, stats in other.models.items():
            self.models.setdefault(name, ModelStats()).merge(stats)
        rank = {"closed": 0, "half_open": 1, "open": 2}
        for name, state in other.breakers.items():
            if rank.get(state, 0) >= rank.get(self.breakers.get(name, "closed"), 0):
                self.breakers[name] = state
        self.replicas += other.replicas
        self.handler = self.handler or other.handler
        self.subject = self.subject or other.subject
        self.durable = self.durable or other.durable
        self.started_at = min(self.started_at, other.started_at) if self.started_at else other.started_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as sent to ``stanchion report`` (without the per-candidate metric counters)."""
        data: dict[str, Any] = _SERVICE_STATS.dump_python(self, mode="json")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceStats:
        """From ``to_dict``'s output (missing figures default to zero)."""
        return _SERVICE_STATS.validate_python(data)


_HISTOGRAM = TypeAdapter(Histogram)
_SERVICE_STATS = TypeAdapter(ServiceStats)
