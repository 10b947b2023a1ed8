"""The whole stack, Route → Fallback → Retry → CircuitBreaker → Timeout, over a scripted terminal and a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import stop_after_attempt, wait_fixed

from stanchion.contracts import TaskEvent
from stanchion.middleware import (
    AllCandidatesFailed,
    AttemptTimeout,
    BreakerPolicy,
    BreakerState,
    Call,
    Candidate,
    CircuitBreaker,
    CircuitOpenError,
    FakeClock,
    Fallback,
    Middleware,
    Retry,
    RetryPolicy,
    Route,
    RouteSpec,
    Stack,
    Terminal,
    Timeout,
)
from tests.unit.fakes import Script, not_found, rate_limited, server_error, unauthorized

EVENT = TaskEvent(id="e1", text="the export button crashes the app")


async def heuristic(call: Call) -> str:
    return "heuristic answer"


class Service:
    """The stack of ARCHITECTURE.md with small numbers: 3 attempts 1 s apart, a breaker tripping at 3 in a row."""

    def __init__(self, terminal: Terminal[str], *, allow_heuristic: bool = True, per_attempt: float = 5.0) -> None:
        self.clock = FakeClock()
        self.breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=3, open_for=30.0), clock=self.clock)
        routes = {"default": RouteSpec((Candidate("primary"), Candidate("backup")), heuristic=allow_heuristic)}
        middleware: list[Middleware[str]] = [
            Route(routes),
            Fallback(heuristic=heuristic),
            Retry(RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(1))),
            self.breaker,
            Timeout(per_attempt=per_attempt),
        ]
        self.stack = Stack(middleware, terminal)

    async def handle(self, *, timeout: float | None = None) -> tuple[str, Call]:
        call = Call(event=EVENT, clock=self.clock, timeout=timeout)
        return await self.stack(call), call


async def test_healthy_primary_serves_at_once() -> None:
    """With nothing failing, the first candidate answers in one attempt and nothing sleeps."""
    script = Script({"primary": ["from primary"], "backup": ["from backup"]})
    service = Service(script)

    answer, call = await service.handle()

    assert answer == "from primary"
    assert (call.served_by, call.degraded, call.attempt) == ("primary", False, 1)
    assert script.calls == ["primary"]
    assert [d.kind for d in call.decisions] == ["route"]
    assert service.clock.sleeps == []


async def test_broken_primary_trips_its_breaker_and_backup_serves() -> None:
    """A primary failing with 503 forever is retried, trips its breaker, and is then skipped for the backup."""
    script = Script({"primary": [server_error()], "backup": ["from backup"]})
    service = Service(script)

    first, call = await service.handle()
    assert (first, call.served_by) == ("from backup", "backup")
    assert script.calls == ["primary", "primary", "primary", "backup"]
    assert service.clock.sleeps == [1.0, 1.0]
    assert await service.breaker.state("primary") is BreakerState.OPEN

    for _ in range(3):
        answer, call = await service.handle()
        assert (answer, call.served_by) == ("from backup", "backup")
        assert call.models_tried == ["primary", "backup"]
        assert ("breaker", "primary", "rejected") in [(d.kind, d.model, d.detail) for d in call.decisions]
    assert script.count("primary") == 3
    assert service.clock.sleeps == [1.0, 1.0]


async def test_recovered_primary_serves_again_after_open_for() -> None:
    """Once ``open_for`` has passed, a probe reaches the recovered primary, which closes its breaker and serves."""
    script = Script({"primary": [server_error(), server_error(), server_error(), "primary is back"], "backup": ["b"]})
    service = Service(script)
    await service.handle()
    service.clock.advance(30.0)

    answer, call = await service.handle()

    assert (answer, call.served_by) == ("primary is back", "primary")
    assert await service.breaker.state("primary") is BreakerState.CLOSED
    assert [d.detail for d in call.decisions if d.kind == "breaker"] == ["open -> half_open", "half_open -> closed"]


async def test_every_candidate_failing_falls_to_the_heuristic() -> None:
    """When both candidates fail permanently, each is tried once and the heuristic answers, degraded."""
    script = Script({"primary": [unauthorized()], "backup": [not_found()]})
    service = Service(script)

    answer, call = await service.handle()

    assert answer == "heuristic answer"
    assert (call.served_by, call.degraded) == ("heuristic", True)
    assert script.calls == ["primary", "backup"]
    assert service.clock.sleeps == []
    assert [d.kind for d in call.decisions] == ["route", "fallback", "fallback", "degraded"]


async def test_without_heuristic_every_cause_reaches_the_caller() -> None:
    """With no heuristic allowed, the caller gets each candidate's last error and the shortest wait asked for."""
    last_primary, last_backup = server_error(), rate_limited(retry_after=2.0)
    script = Script(
        {
            "primary": [server_error(), server_error(), last_primary],
            "backup": [rate_limited(retry_after=1.0), rate_limited(retry_after=1.0), last_backup],
        }
    )
    service = Service(script, allow_heuristic=False)

    with pytest.raises(AllCandidatesFailed) as raised:
        await service.handle()
    assert raised.value.exceptions == (last_primary, last_backup)
    assert raised.value.transient
    assert raised.value.retry_after == 2.0
    assert len(script.calls) == 6


async def test_rate_limit_with_retry_after_is_waited_out() -> None:
    """Two 429s asking for 1 s, then success: three attempts, two 1 s sleeps, served by the primary."""
    script = Script({"primary": [rate_limited(retry_after=1.0), rate_limited(retry_after=1.0), "ok"], "backup": ["b"]})
    service = Service(script)

    answer, call = await service.handle()

    assert (answer, call.served_by) == ("ok", "primary")
    assert call.attempt == 3
    assert service.clock.sleeps == [1.0, 1.0]
    assert [d.kind for d in call.decisions] == ["route", "retry", "retry"]
    assert await service.breaker.state("primary") is BreakerState.CLOSED


async def test_retries_stop_short_of_the_deadline_leaving_time_for_the_backup() -> None:
    """With 1.5 s of budget the primary is retried once, not twice, and the backup still answers in time."""
    script = Script({"primary": [server_error()], "backup": ["from backup"]})
    service = Service(script)

    answer, call = await service.handle(timeout=1.5)

    assert (answer, call.served_by) == ("from backup", "backup")
    assert script.calls == ["primary", "primary", "backup"]
    assert service.clock.sleeps == [1.0]


async def test_hanging_primary_is_cut_off_per_attempt() -> None:
    """A primary that never answers times out on each attempt, counts toward its breaker, and the backup serves."""

    async def terminal(call: Call) -> str:
        assert call.candidate is not None
        if call.candidate.name == "primary":
            await asyncio.Event().wait()
        return f"from {call.candidate.name}"

    service = Service(terminal, per_attempt=0.01)

    answer, call = await service.handle()

    assert (answer, call.served_by) == ("from backup", "backup")
    assert [d.kind for d in call.decisions].count("timeout") == 3
    assert await service.breaker.state("primary") is BreakerState.OPEN
    fallback = next(d for d in call.decisions if d.kind == "fallback")
    assert fallback.detail.startswith(AttemptTimeout.__name__)


async def test_open_breakers_everywhere_report_when_to_come_back() -> None:
    """With both breakers open and no heuristic, the caller learns the soonest a breaker lets a probe through."""
    script = Script({"primary": [server_error()], "backup": [server_error()]})
    service = Service(script, allow_heuristic=False)
    with pytest.raises(AllCandidatesFailed):
        await service.handle()
    assert service.clock.now() == 1_004.0  # primary tripped at 1002 and backup at 1004, after two 1 s waits each
    service.clock.advance(10.0)

    with pytest.raises(AllCandidatesFailed) as raised:
        await service.handle()
    rejections = [e for e in raised.value.exceptions if isinstance(e, CircuitOpenError)]
    assert [(e.candidate, e.retry_in) for e in rejections] == [("primary", 18.0), ("backup", 20.0)]
    assert raised.value.retry_after == 18.0
    assert raised.value.transient
