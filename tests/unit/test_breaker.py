"""CircuitBreaker: closed → open → half-open → closed per candidate, on an injected clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic_ai.exceptions import ModelHTTPError

from stanchion.middleware import (
    BreakerPolicy,
    BreakerState,
    Call,
    Candidate,
    CircuitBreaker,
    CircuitOpenError,
    FakeClock,
    InMemoryBreakerStore,
)
from tests.unit.fakes import Countdown, Outcome, Script, server_error, unauthorized

Transition = tuple[str, BreakerState, BreakerState]


def make_breaker(clock: FakeClock, transitions: list[Transition] | None = None, **policy: Any) -> CircuitBreaker:
    listeners = [lambda key, old, new: transitions.append((key, old, new))] if transitions is not None else []
    return CircuitBreaker(BreakerPolicy(**policy), clock=clock, on_transition=listeners)


def make_call(clock: FakeClock, candidate: str = "primary") -> Call:
    call = Call(event=None, clock=clock)
    call.candidate = Candidate(candidate)
    return call


async def attempt(breaker: CircuitBreaker, call: Call, outcome: Outcome) -> Outcome:
    """One call through the breaker: the answer, or the error it raised."""
    try:
        return await breaker(call, Script({call.candidate.name if call.candidate else "default": [outcome]}))
    except Exception as exc:
        return exc


async def trip(breaker: CircuitBreaker, call: Call, failures: int) -> None:
    for _ in range(failures):
        assert isinstance(await attempt(breaker, call, server_error()), Exception)


async def test_trips_after_consecutive_failures() -> None:
    """The third transient failure in a row opens the breaker; the second does not."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=3)
    call = make_call(clock)

    await trip(breaker, call, 2)
    assert await breaker.state("primary") is BreakerState.CLOSED
    await trip(breaker, call, 1)
    assert await breaker.state("primary") is BreakerState.OPEN


async def test_a_success_resets_the_consecutive_count() -> None:
    """Failures separated by a success are not consecutive."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=3)
    call = make_call(clock)

    await trip(breaker, call, 2)
    assert await attempt(breaker, call, "ok") == "ok"
    await trip(breaker, call, 2)
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_trips_on_failure_rate_once_the_window_has_min_calls() -> None:
    """At 50 % over a window of 4, failures trip it only once 4 calls are in the window."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=100, failure_rate=0.5, window=4, min_calls=4)
    call = make_call(clock)

    outcomes: list[Outcome] = [server_error(), "ok", server_error(), "ok"]
    for outcome in outcomes:
        await attempt(breaker, call, outcome)
    assert await breaker.state("primary") is BreakerState.CLOSED  # 50 %, but the last call succeeded
    await attempt(breaker, call, server_error())
    assert await breaker.state("primary") is BreakerState.OPEN


async def test_failure_rate_ignores_calls_below_min_calls() -> None:
    """Three failures out of three do not trip a breaker that needs four calls to judge."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=100, failure_rate=0.5, window=10, min_calls=4)
    call = make_call(clock)

    await trip(breaker, call, 3)
    assert await breaker.state("primary") is BreakerState.CLOSED
    await trip(breaker, call, 1)
    assert await breaker.state("primary") is BreakerState.OPEN


async def test_failure_rate_window_slides() -> None:
    """Only the last ``window`` calls count: old failures fall out of it."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=100, failure_rate=0.75, window=4, min_calls=4)
    call = make_call(clock)

    outcomes: list[Outcome] = [server_error(), server_error(), "ok", "ok", "ok", server_error()]
    for outcome in outcomes:
        await attempt(breaker, call, outcome)
    assert (await breaker.store.get("primary")).outcomes == (False, False, False, True)
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_open_breaker_rejects_without_calling() -> None:
    """An open breaker raises CircuitOpenError naming the candidate and when it may let a probe through."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=30.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(10.0)
    call = make_call(clock)
    script = Script({"primary": ["ok"]})

    with pytest.raises(CircuitOpenError) as raised:
        await breaker(call, script)
    assert script.calls == []
    assert (raised.value.candidate, raised.value.retry_in, raised.value.state) == ("primary", 20.0, "open")
    assert str(raised.value) == "circuit of 'primary' is open; rejecting calls for 20s"
    assert [(d.kind, d.model, d.detail) for d in call.decisions] == [("breaker", "primary", "rejected")]
    assert call.decisions[0].data == {"state": "open", "retry_in_s": 20.0}


async def test_goes_half_open_after_open_for_and_closes_on_probe_success() -> None:
    """Once ``open_for`` has passed one probe goes through; its success closes the breaker."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=30.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(29.9)
    assert isinstance(await attempt(breaker, make_call(clock), "ok"), CircuitOpenError)
    clock.advance(0.1)
    seen: list[BreakerState] = []

    async def probe(call: Call) -> str:
        seen.append(await breaker.state("primary"))
        return "ok"

    assert await breaker(make_call(clock), probe) == "ok"
    assert seen == [BreakerState.HALF_OPEN]
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_reopens_when_the_probe_fails() -> None:
    """A failed probe opens the breaker again for a full ``open_for``."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=30.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(30.0)

    assert isinstance(await attempt(breaker, make_call(clock), server_error()), Exception)
    assert await breaker.state("primary") is BreakerState.OPEN
    rejected = await attempt(breaker, make_call(clock), "ok")
    assert isinstance(rejected, CircuitOpenError)
    assert rejected.retry_in == 30.0


async def test_only_half_open_probes_go_through_at_once() -> None:
    """While half-open, at most ``half_open_probes`` calls are in flight; the rest are rejected."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=5.0, half_open_probes=2)
    await trip(breaker, make_call(clock), 1)
    clock.advance(5.0)
    release = asyncio.Event()
    settled = Countdown(5)

    async def slow(call: Call) -> str:
        settled.check_in()
        await release.wait()
        return "ok"

    async def one() -> Outcome:
        try:
            return await breaker(make_call(clock), slow)
        except CircuitOpenError as exc:
            settled.check_in()
            return exc

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await settled.wait()
    release.set()
    results = await asyncio.gather(*tasks)

    assert results.count("ok") == 2
    rejections = [r for r in results if isinstance(r, CircuitOpenError)]
    assert len(rejections) == 3
    assert {r.state for r in rejections} == {"half_open"}
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_needs_every_probe_to_succeed_before_closing() -> None:
    """With two probes, the first success keeps it half-open and the second closes it."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=5.0, half_open_probes=2)
    await trip(breaker, make_call(clock), 1)
    clock.advance(5.0)

    assert await attempt(breaker, make_call(clock), "ok") == "ok"
    assert await breaker.state("primary") is BreakerState.HALF_OPEN
    assert await attempt(breaker, make_call(clock), "ok") == "ok"
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_a_cancelled_probe_frees_its_slot() -> None:
    """A probe cancelled mid-flight neither closes nor reopens the breaker, and lets the next probe through."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=5.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(5.0)
    entered = asyncio.Event()

    async def hang(call: Call) -> str:
        entered.set()
        await asyncio.Event().wait()
        return "never"

    probe = asyncio.create_task(breaker(make_call(clock), hang))
    await entered.wait()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe

    assert await breaker.state("primary") is BreakerState.HALF_OPEN
    assert await attempt(breaker, make_call(clock), "ok") == "ok"
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_a_call_admitted_before_opening_does_not_decide_the_probe() -> None:
    """A slow call let in while closed that succeeds during half-open neither closes the breaker nor frees a slot."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=5.0)
    release_old, release_probe = asyncio.Event(), asyncio.Event()
    entered = Countdown(1)

    async def old(call: Call) -> str:
        entered.check_in()
        await release_old.wait()
        return "late"

    async def probe(call: Call) -> str:
        await release_probe.wait()
        return "probe"

    slow = asyncio.create_task(breaker(make_call(clock), old))
    await entered.wait()
    await trip(breaker, make_call(clock), 1)
    clock.advance(5.0)
    probing = asyncio.create_task(breaker(make_call(clock), probe))
    await asyncio.sleep(0)

    release_old.set()
    assert await slow == "late"
    assert await breaker.state("primary") is BreakerState.HALF_OPEN
    assert isinstance(await attempt(breaker, make_call(clock), "ok"), CircuitOpenError)
    release_probe.set()
    assert await probing == "probe"
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_forced_open_rejects_until_reset() -> None:
    """A forced-open breaker rejects every call, however long it waits, with no ``retry_in``; ``reset`` closes it."""
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make_breaker(clock, transitions, open_for=1.0)

    await breaker.force_open("primary")
    clock.advance(3600.0)
    rejected = await attempt(breaker, make_call(clock), "ok")
    assert isinstance(rejected, CircuitOpenError)
    assert (rejected.retry_in, rejected.state) == (None, "forced_open")
    assert "until reset" in str(rejected)

    await breaker.reset("primary")
    assert await attempt(breaker, make_call(clock), "ok") == "ok"
    assert transitions == [
        ("primary", BreakerState.CLOSED, BreakerState.FORCED_OPEN),
        ("primary", BreakerState.FORCED_OPEN, BreakerState.CLOSED),
    ]


async def test_disabled_breaker_lets_everything_through_and_never_trips() -> None:
    """A disabled breaker passes every failure on unchanged and never opens."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1)
    await breaker.disable("primary")
    error = server_error()

    for _ in range(5):
        assert await attempt(breaker, make_call(clock), error) is error
    assert await breaker.state("primary") is BreakerState.DISABLED


async def test_reset_empties_the_window() -> None:
    """After ``reset`` earlier failures no longer count toward tripping."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=2)
    await trip(breaker, make_call(clock), 1)

    await breaker.reset("primary")
    await trip(breaker, make_call(clock), 1)
    assert await breaker.state("primary") is BreakerState.CLOSED


async def test_permanent_failures_do_not_count() -> None:
    """Auth errors and bugs pass through but never trip the breaker, nor break a run of transient failures."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=2)
    call = make_call(clock)

    for error in [unauthorized(), ValueError("bug"), unauthorized(), unauthorized()]:
        assert await attempt(breaker, call, error) is error
    assert await breaker.state("primary") is BreakerState.CLOSED
    await trip(breaker, call, 1)
    await attempt(breaker, call, unauthorized())
    await trip(breaker, call, 1)
    assert await breaker.state("primary") is BreakerState.OPEN


async def test_counts_predicate_decides_what_counts() -> None:
    """A custom ``counts`` can make permanent failures trip the breaker."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=2, counts=lambda exc: True)

    for _ in range(2):
        await attempt(breaker, make_call(clock), unauthorized())
    assert await breaker.state("primary") is BreakerState.OPEN


async def test_transitions_reach_listeners_and_decisions() -> None:
    """Every state change is told to ``on_transition`` listeners and recorded as a ``breaker`` decision."""
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make_breaker(clock, transitions, consecutive_failures=1, open_for=5.0)
    failing, probing = make_call(clock), make_call(clock)

    await attempt(breaker, failing, server_error())
    clock.advance(5.0)
    await attempt(breaker, probing, "ok")

    assert transitions == [
        ("primary", BreakerState.CLOSED, BreakerState.OPEN),
        ("primary", BreakerState.OPEN, BreakerState.HALF_OPEN),
        ("primary", BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert [(d.kind, d.model, d.detail) for d in failing.decisions] == [("breaker", "primary", "closed -> open")]
    assert [(d.kind, d.detail) for d in probing.decisions] == [
        ("breaker", "open -> half_open"),
        ("breaker", "half_open -> closed"),
    ]
    assert probing.decisions[-1].data == {"state": "closed"}


async def test_no_decision_without_a_state_change() -> None:
    """Calls that leave the state as it was record nothing."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=3)
    call = make_call(clock)

    await attempt(breaker, call, "ok")
    await trip(breaker, call, 2)
    assert call.decisions == []


async def test_each_candidate_has_its_own_breaker() -> None:
    """Tripping one candidate's breaker leaves the others closed and callable."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1)
    await trip(breaker, make_call(clock, "primary"), 1)

    assert await attempt(breaker, make_call(clock, "backup"), "ok") == "ok"
    assert await breaker.state("primary") is BreakerState.OPEN
    assert await breaker.state("backup") is BreakerState.CLOSED


async def test_a_call_without_candidate_uses_the_default_key() -> None:
    """Calls with no candidate share the ``default`` breaker."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1)

    assert isinstance(await attempt(breaker, Call(event=None, clock=clock), server_error()), Exception)
    assert await breaker.state("default") is BreakerState.OPEN


async def test_per_candidate_policy_overrides_the_default() -> None:
    """A candidate with its own policy trips by it; the others use the default policy."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        BreakerPolicy(consecutive_failures=3),
        per_candidate={"fragile": BreakerPolicy(consecutive_failures=1)},
        clock=clock,
    )
    await trip(breaker, make_call(clock, "fragile"), 1)
    await trip(breaker, make_call(clock, "sturdy"), 1)

    assert await breaker.state("fragile") is BreakerState.OPEN
    assert await breaker.state("sturdy") is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures"),
        ({"failure_rate": 0.0}, "failure_rate"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": float("nan")}, "failure_rate"),
        ({"window": 0, "min_calls": 0}, "min_calls"),
        ({"window": 5, "min_calls": 6}, "min_calls"),
        ({"min_calls": 0}, "min_calls"),
        ({"open_for": -1.0}, "open_for"),
        ({"half_open_probes": 0}, "half_open_probes"),
        ({"probe_lease": 0.0}, "probe_lease"),
        ({"probe_lease": float("nan")}, "probe_lease"),
    ],
)
def test_policy_rejects_invalid_settings(settings: dict[str, Any], message: str) -> None:
    """Impossible breaker settings fail when the policy is built, naming the setting."""
    with pytest.raises(ValueError, match=message):
        BreakerPolicy(**settings)


def test_policy_accepts_edge_settings() -> None:
    """The boundary values are valid: one failure, rate 1.0, a one-call window, zero open time."""
    policy = BreakerPolicy(consecutive_failures=1, failure_rate=1.0, window=1, min_calls=1, open_for=0.0)
    assert policy.window == policy.min_calls == 1


async def test_concurrent_calls_keep_counts_consistent() -> None:
    """Many interleaved calls through the in-memory store are each counted exactly once."""
    clock = FakeClock()
    store = InMemoryBreakerStore()
    breaker = CircuitBreaker(
        BreakerPolicy(consecutive_failures=1000, failure_rate=1.0, window=100, min_calls=100), store=store, clock=clock
    )

    async def one(n: int) -> None:
        async def terminal(call: Call) -> str:
            for _ in range(n % 3):
                await asyncio.sleep(0)
            if n % 2:
                raise server_error()
            return "ok"

        with contextlib.suppress(ModelHTTPError):
            await breaker(make_call(clock), terminal)

    await asyncio.gather(*(one(n) for n in range(60)))
    record = await store.get("primary")
    assert len(record.outcomes) == 60
    assert sum(record.outcomes) == 30
    assert record.state is BreakerState.CLOSED


async def test_many_concurrent_failures_trip_it_once() -> None:
    """When many in-flight calls fail together the breaker opens once, and late failures change nothing."""
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make_breaker(clock, transitions, consecutive_failures=3, open_for=30.0)
    release = asyncio.Event()
    entered = Countdown(10)

    async def fail_later(call: Call) -> str:
        entered.check_in()
        await release.wait()
        raise server_error()

    async def one() -> Outcome:
        try:
            return await breaker(make_call(clock), fail_later)
        except Exception as exc:
            return exc

    tasks = [asyncio.create_task(one()) for _ in range(10)]
    await entered.wait()
    release.set()
    await asyncio.gather(*tasks)

    assert transitions == [("primary", BreakerState.CLOSED, BreakerState.OPEN)]
    clock.advance(30.0)
    assert await attempt(breaker, make_call(clock), "ok") == "ok"


async def test_recovers_on_a_clock_that_starts_at_zero() -> None:
    """A breaker opened at time 0.0 still lets a probe through once ``open_for`` has passed."""
    clock = FakeClock(start=0.0)
    breaker = make_breaker(clock, consecutive_failures=1, open_for=10.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(10.0)

    assert await attempt(breaker, make_call(clock), "ok") == "ok"


async def test_half_open_rejection_never_reports_a_negative_wait() -> None:
    """A call rejected because the probe slot is taken gets a ``retry_in`` of zero or more, never negative."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=10.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(15.0)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(call: Call) -> str:
        entered.set()
        await release.wait()
        return "ok"

    probe = asyncio.create_task(breaker(make_call(clock), slow))
    await entered.wait()
    try:
        rejected = await attempt(breaker, make_call(clock), "ok")
    finally:
        release.set()
        await probe

    assert isinstance(rejected, CircuitOpenError)
    assert rejected.retry_in is not None
    assert rejected.retry_in >= 0.0


def test_a_probe_lease_lasts_the_open_period_at_least_a_second_unless_set() -> None:
    """By default a probe holds its slot for ``open_for`` (1 s when that is shorter); ``probe_lease`` overrides it."""
    assert BreakerPolicy(open_for=30.0).lease == 30.0
    assert BreakerPolicy(open_for=0.0).lease == 1.0
    assert BreakerPolicy(open_for=30.0, probe_lease=5.0).lease == 5.0


def test_the_fake_clocks_wall_time_moves_with_its_monotonic_time() -> None:
    """``wall`` starts where asked and advances (and sleeps) with ``now``."""
    clock = FakeClock(start=5.0, wall=1_700_000_000.0)
    clock.advance(2.5)
    assert (clock.now(), clock.wall()) == (7.5, 1_700_000_002.5)


async def test_opened_at_is_wall_clock_time() -> None:
    """A record read on another host must mean the same moment: ``opened_at`` is the clock's wall time."""
    clock = FakeClock(start=10.0, wall=1_700_000_000.0)
    store = InMemoryBreakerStore()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=1), store=store, clock=clock)
    await trip(breaker, make_call(clock), 1)
    assert (await store.get("primary")).opened_at == 1_700_000_000.0


async def test_an_expired_probe_lease_frees_its_slot_and_its_late_result_is_ignored() -> None:
    """A probe that never reports holds its slot for the lease only; then the next call is the probe, and the
    first one's late success decides nothing."""
    clock = FakeClock()
    breaker = make_breaker(clock, consecutive_failures=1, open_for=5.0, probe_lease=8.0)
    await trip(breaker, make_call(clock), 1)
    clock.advance(5.0)
    entered = [asyncio.Event(), asyncio.Event()]
    release = [asyncio.Event(), asyncio.Event()]

    def held(n: int, answer: str) -> Callable[[Call], Awaitable[str]]:
        async def terminal(call: Call) -> str:
            entered[n].set()
            await release[n].wait()
            return answer

        return terminal

    first = asyncio.create_task(breaker(make_call(clock), held(0, "late")))
    await entered[0].wait()
    clock.advance(7.9)
    assert isinstance(await attempt(breaker, make_call(clock), "ok"), CircuitOpenError)
    clock.advance(0.1)
    second = asyncio.create_task(breaker(make_call(clock), held(1, "probe")))
    await entered[1].wait()
    assert (await breaker.store.get("primary")).probes_in_flight == 1  # the expired lease gave its slot away

    release[0].set()
    assert await first == "late"
    assert await breaker.state("primary") is BreakerState.HALF_OPEN
    release[1].set()
    assert await second == "probe"
    assert await breaker.state("primary") is BreakerState.CLOSED
