"""Timeout: bounds each attempt, and never lets one run past the event's deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from stanchion.middleware.call import Call
from stanchion.middleware.errors import AttemptTimeout, DeadlineExceeded
from stanchion.middleware.stack import Next

R = TypeVar("R")


@dataclass(frozen=True)
class Timeout:
    """Cancels an attempt after ``per_attempt`` seconds (or what is left of the deadline, if less).

    A timed-out attempt raises ``AttemptTimeout``, a transient failure. With the deadline already
    spent it raises ``DeadlineExceeded`` without calling.

    Args:
        per_attempt: Seconds per attempt.
        per_route: Per-attempt seconds for named routes.
    """

    per_attempt: float = 30.0
    per_route: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, seconds in {"per_attempt": self.per_attempt, **self.per_route}.items():
            if not seconds > 0:  # also refuses NaN
                raise ValueError(f"timeout {name!r} must be > 0 seconds, got {seconds}")

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        limit = self.per_route.get(call.route, self.per_attempt)
        remaining = call.remaining()
        by_deadline = False
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded(call.timeout)
            by_deadline = remaining < limit
            limit = min(limit, remaining)
        timer = asyncio.timeout(limit)
        try:
            async with timer:
                return await call_next(call)
        except TimeoutError as exc:
            if not timer.expired():  # a timeout raised below us, not ours: leave it as it is
                raise
            call.decide("timeout", f"attempt cancelled after {limit:.3g}s", limit_s=round(limit, 3))
            if by_deadline:
                # The event ran out of time, not the model: don't count it against the candidate's breaker.
                raise DeadlineExceeded(call.timeout) from exc
            raise AttemptTimeout(call.candidate.name if call.candidate else None, limit) from exc
