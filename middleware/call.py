"""``Call``: the per-event context that flows down the stack, and ``Candidate``: one model to try."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stanchion.contracts import Decision, Usage
from stanchion.middleware.clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True)
class Candidate:
    """One model the stack may try: a name for logs and breakers, and whatever the terminal needs.

    Args:
        name: Stable name ("primary", "fast"...); keys the circuit breaker and appears in envelopes.
        target: Opaque to the middleware; the terminal step uses it (e.g. a pydantic-ai model).
    """

    name: str
    target: Any = None


@dataclass
class Call:
    """Everything known about one event while it is handled. Only the stack mutates it.

    Args:
        event: The validated event.
        subject: The subject it arrived on (empty outside NATS).
        headers: Its headers.
        clock: Time source shared by every middleware.
        timeout: Overall per-event budget in seconds; ``None`` for none.
        delivery: How many times the message has been delivered (1 on first delivery).
        may_retry: Whether Retry may retry in-process (the transport turns it off for redeliveries, so that
            attempts do not multiply by deliveries).
    """

    event: Any
    subject: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    clock: Clock = SYSTEM_CLOCK
    timeout: float | None = None
    delivery: int = 1
    may_retry: bool = True
    route: str = "default"
    candidates: tuple[Candidate, ...] = ()
    allow_heuristic: bool = True
    candidate: Candidate | None = None
    attempt: int = 0
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    served_by: str | None = None
    degraded: bool = False
    trace_id: str | None = None
    models_tried: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    slot_wait_s: float = 0.0
    """Seconds the current attempt waited for a slot of its candidate's bulkhead."""
    started_at: float = field(init=False)
    deadline: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.started_at = self.clock.now()
        self.deadline = None if self.timeout is None else self.started_at + self.timeout

    @property
    def elapsed(self) -> float:
        return self.clock.now() - self.started_at

    def remaining(self) -> float | None:
        """Seconds left before the event's deadline, ``None`` when it has none."""
        return None if self.deadline is None else self.deadline - self.clock.now()

    def tighten_deadline(self, seconds: float) -> None:
        """Bring the deadline forward to ``seconds`` after the start, never push it back."""
        candidate = self.started_at + seconds
        self.deadline = candidate if self.deadline is None else min(self.deadline, candidate)

    def decide(self, kind: str, detail: str = "", *, model: str | None = None, **data: Any) -> Decision:
        """Record a decision of the stack, timed from the start of the event."""
        # model_construct: the stack builds these itself, on the hot path; validation would only cost time.
        decision = Decision.model_construct(
            kind=kind,
            model=model if model is not None else (self.candidate.name if self.candidate else None),
            detail=detail,
            at_ms=round(self.elapsed * 1000, 3),
            data=data,
        )
        self.decisions.append(decision)
        return decision

    def add_usage(self, usage: Usage, cost_usd: float | None) -> None:
        """Add one request's usage; cost stays ``None`` only while no price is known."""
        self.usage = self.usage + usage
        if cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost_usd
