"""Timeout: each attempt is cut off after ``per_attempt`` seconds, or sooner if the event's deadline is nearer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stanchion.middleware import (
    AttemptTimeout,
    Call,
    Candidate,
    DeadlineExceeded,
    FailureKind,
    FakeClock,
    Timeout,
    failure_kind,
)

TINY = 0.02
"""A real timeout short enough to keep the suite fast."""


def make_call(*, clock: FakeClock | None = None, timeout: float | None = None, route: str = "default") -> Call:
    call = Call(event=None, clock=clock or FakeClock(), timeout=timeout)
    call.route = route
    call.candidate = Candidate("primary")
    return call


class Hang:
    """A terminal that never answers, and notes whether it was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    async def __call__(self, call: Call) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "never"


async def quick(call: Call) -> str:
    return "answer"


async def test_fast_attempt_returns_its_result() -> None:
    """An attempt that finishes in time is returned unchanged, with no decision recorded."""
    call = make_call()

    assert await Timeout(per_attempt=TINY)(call, quick) == "answer"
    assert call.decisions == []


async def test_slow_attempt_is_cancelled_with_attempt_timeout() -> None:
    """An attempt running past ``per_attempt`` is cancelled and raises a transient ``AttemptTimeout``."""
    call = make_call()
    hang = Hang()

    with pytest.raises(AttemptTimeout) as raised:
        await Timeout(per_attempt=TINY)(call, hang)
    assert hang.cancelled
    assert (raised.value.candidate, raised.value.seconds) == ("primary", TINY)
    assert isinstance(raised.value.__cause__, TimeoutError)
    assert failure_kind(raised.value) is FailureKind.TRANSIENT
    assert [(d.kind, d.model, d.data) for d in call.decisions] == [("timeout", "primary", {"limit_s": TINY})]


async def test_deadline_nearer_than_per_attempt_bounds_the_attempt() -> None:
    """With less of the event's deadline left than ``per_attempt``, the attempt gets only what is left, and
    running out raises ``DeadlineExceeded`` (the event's fault, not the model's: no breaker count, no retry)."""
    call = make_call(timeout=TINY)
    hang = Hang()

    with pytest.raises(DeadlineExceeded) as raised:
        await Timeout(per_attempt=30.0)(call, hang)
    assert hang.cancelled
    assert raised.value.deadline_s == TINY
    assert failure_kind(raised.value) is FailureKind.REJECTED
    assert [d.data["limit_s"] for d in call.decisions] == [pytest.approx(TINY, abs=1e-3)]


async def test_spent_deadline_raises_deadline_exceeded_without_calling() -> None:
    """When the deadline is already spent, the attempt is not even started."""
    clock = FakeClock()
    call = make_call(clock=clock, timeout=5.0)
    clock.advance(5.0)
    started: list[Call] = []

    async def terminal(call: Call) -> str:
        started.append(call)
        return "answer"

    with pytest.raises(DeadlineExceeded) as raised:
        await Timeout(per_attempt=30.0)(call, terminal)
    assert started == []
    assert raised.value.deadline_s == 5.0
    assert failure_kind(raised.value) is FailureKind.REJECTED


async def test_timeout_error_from_below_passes_through_unchanged() -> None:
    """A ``TimeoutError`` raised by the inner step itself is not mistaken for this middleware's timeout."""
    error = TimeoutError("upstream gave up")

    async def terminal(call: Call) -> str:
        raise error

    call = make_call()
    with pytest.raises(TimeoutError) as raised:
        await Timeout(per_attempt=30.0)(call, terminal)
    assert raised.value is error
    assert call.decisions == []


async def test_per_route_limit_overrides_per_attempt() -> None:
    """The limit named after ``call.route`` applies instead of ``per_attempt``."""
    timeout = Timeout(per_attempt=30.0, per_route={"fast": TINY})

    with pytest.raises(AttemptTimeout) as raised:
        await timeout(make_call(route="fast"), Hang())
    assert raised.value.seconds == TINY


async def test_call_without_candidate_times_out_anonymously() -> None:
    """An attempt with no candidate still times out, naming no candidate."""
    with pytest.raises(AttemptTimeout) as raised:
        await Timeout(per_attempt=TINY)(Call(event=None), Hang())
    assert raised.value.candidate is None
    assert str(raised.value) == "attempt on None timed out after 0.02s"


@pytest.mark.parametrize(
    "settings",
    [{"per_attempt": 0.0}, {"per_attempt": -1.0}, {"per_route": {"fast": 0.0}}, {"per_route": {"fast": -5.0}}],
    ids=["zero", "negative", "zero route", "negative route"],
)
def test_non_positive_limits_are_rejected(settings: dict[str, Any]) -> None:
    """A limit of zero or less fails when the middleware is built."""
    with pytest.raises(ValueError, match="must be > 0"):
        Timeout(**settings)
