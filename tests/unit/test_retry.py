"""Retry: transient failures are retried on the same candidate, within the attempt limit and the deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pydantic_ai.exceptions import (
    ModelConnectionError,
    ModelHTTPError,
    ModelOverloadedError,
    ModelQuotaExceededError,
    ModelRequestTimeout,
    ModelTimeoutError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)
from tenacity import stop_after_attempt, stop_after_delay, wait_fixed, wait_incrementing

from stanchion.middleware import AttemptTimeout, Call, Candidate, FakeClock, Retry, RetryPolicy, wait_retry_after
from tests.unit.fakes import (
    Outcome,
    Script,
    context_window,
    not_found,
    rate_limited,
    server_error,
    unauthorized,
)

FIXED = RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(1))
"""Three attempts one second apart: easy to reason about in assertions."""


def make_call(clock: FakeClock, *, timeout: float | None = None, route: str = "default") -> Call:
    call = Call(event=None, clock=clock, timeout=timeout)
    call.route = route
    call.candidate = Candidate("primary")
    return call


async def run(retry: Retry, call: Call, *outcomes: Outcome) -> str:
    return await retry(call, Script({"primary": outcomes}))


TRANSIENT: dict[str, Callable[[], Exception]] = {
    "429 rate limit": rate_limited,
    "503 server error": server_error,
    "500 server error": lambda: server_error(500),
    "503 unavailable": lambda: ModelHTTPError.for_category(ModelUnavailableError, status_code=503, model_name="m"),
    "529 overloaded": lambda: ModelHTTPError.for_category(ModelOverloadedError, status_code=529, model_name="m"),
    "plain 502": lambda: ModelHTTPError(502, "m"),
    "plain 408": lambda: ModelHTTPError(408, "m"),
    "connection reset": lambda: ModelConnectionError("m", "connection reset", phase="read"),
    "transport timeout": lambda: ModelTimeoutError("m", "read timed out"),
    "request timeout": lambda: ModelRequestTimeout("m", 10.0),
    "attempt timeout": lambda: AttemptTimeout("primary", 5.0),
}

PERMANENT: dict[str, Callable[[], Exception]] = {
    "401 auth": unauthorized,
    "404 not found": not_found,
    "400 context window": context_window,
    "402 quota": lambda: ModelHTTPError.for_category(ModelQuotaExceededError, status_code=402, model_name="m"),
    "plain 400": lambda: ModelHTTPError(400, "m"),
    "unexpected behaviour": lambda: UnexpectedModelBehavior("output failed validation"),
    "programming error": lambda: ValueError("bug"),
}


@pytest.mark.parametrize("make_error", TRANSIENT.values(), ids=TRANSIENT.keys())
async def test_transient_failures_are_retried_until_success(make_error: Callable[[], Exception]) -> None:
    """A transient failure is retried on the same candidate, and a later success is returned."""
    clock = FakeClock()
    call = make_call(clock)

    assert await run(Retry(FIXED), call, make_error(), make_error(), "ok") == "ok"
    assert call.attempt == 3
    assert clock.sleeps == [1.0, 1.0]


@pytest.mark.parametrize("make_error", PERMANENT.values(), ids=PERMANENT.keys())
async def test_permanent_failures_are_never_retried(make_error: Callable[[], Exception]) -> None:
    """A permanent failure is raised as it is after one attempt, without sleeping."""
    clock = FakeClock()
    call = make_call(clock)
    error = make_error()

    with pytest.raises(type(error)) as raised:
        await run(Retry(FIXED), call, error, "ok")
    assert raised.value is error
    assert call.attempt == 1
    assert clock.sleeps == []
    assert call.decisions == []


async def test_retry_after_replaces_the_backoff() -> None:
    """A provider's ``retry_after`` is what the retry waits, instead of the policy's backoff."""
    clock = FakeClock()
    call = make_call(clock)
    retry = Retry(RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(7)))

    assert await run(retry, call, rate_limited(retry_after=2.5), rate_limited(retry_after=0.5), "ok") == "ok"
    assert clock.sleeps == [2.5, 0.5]


async def test_retry_after_header_is_honoured() -> None:
    """A ``Retry-After`` header parsed by pydantic-ai is honoured like an explicit ``retry_after``."""
    clock = FakeClock()
    error = ModelHTTPError(429, "m", headers={"Retry-After": "4"})

    assert await run(Retry(FIXED), make_call(clock), error, "ok") == "ok"
    assert clock.sleeps == [4.0]


async def test_retry_after_is_capped_by_max_retry_after() -> None:
    """A ``retry_after`` longer than ``max_retry_after`` is cut to the cap."""
    clock = FakeClock()
    retry = Retry(RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(1), max_retry_after=5.0))

    assert await run(retry, make_call(clock), rate_limited(retry_after=120.0), "ok") == "ok"
    assert clock.sleeps == [5.0]


async def test_gives_up_at_the_attempt_limit_reraising_the_last_error() -> None:
    """After the last allowed attempt the last error itself is raised, not a wrapper."""
    clock = FakeClock()
    call = make_call(clock)
    errors = [server_error(), server_error(502), server_error(504), server_error()]

    with pytest.raises(ModelHTTPError) as raised:
        await run(Retry(FIXED), call, *errors)
    assert raised.value is errors[2]
    assert call.attempt == 3
    assert clock.sleeps == [1.0, 1.0]


async def test_stops_early_when_the_next_sleep_would_pass_the_deadline() -> None:
    """With 2.5 s of budget and 1 s waits, the third failure is final although ten attempts are allowed."""
    clock = FakeClock()
    call = make_call(clock, timeout=2.5)
    retry = Retry(RetryPolicy(stop=stop_after_attempt(10), wait=wait_fixed(1)))
    last = server_error(504)

    with pytest.raises(ModelHTTPError) as raised:
        await run(retry, call, server_error(), server_error(), last)
    assert raised.value is last
    assert call.attempt == 3
    assert clock.sleeps == [1.0, 1.0]


async def test_does_not_wait_for_a_retry_after_beyond_the_deadline() -> None:
    """A ``retry_after`` longer than the time left ends the retries at once, without sleeping."""
    clock = FakeClock()
    call = make_call(clock, timeout=5.0)
    error = rate_limited(retry_after=10.0)

    with pytest.raises(ModelHTTPError) as raised:
        await run(Retry(FIXED), call, error, "ok")
    assert raised.value is error
    assert clock.sleeps == []


async def test_each_retry_is_recorded_as_a_decision() -> None:
    """Every retry adds a ``retry`` decision naming the candidate, the failed attempt, the error and the wait."""
    clock = FakeClock()
    call = make_call(clock)

    await run(Retry(FIXED), call, rate_limited(), server_error(), "ok")

    assert [d.kind for d in call.decisions] == ["retry", "retry"]
    assert [d.model for d in call.decisions] == ["primary", "primary"]
    assert [d.data for d in call.decisions] == [
        {"attempt": 1, "failure": "transient", "wait_s": 1.0},
        {"attempt": 2, "failure": "transient", "wait_s": 1.0},
    ]
    assert call.decisions[0].detail.startswith("ModelRateLimitError: status_code: 429")
    assert call.decisions[1].detail.startswith("ModelServerError: status_code: 503")
    assert [d.at_ms for d in call.decisions] == [0.0, 1000.0]


async def test_per_route_policy_overrides_the_default() -> None:
    """The policy named after ``call.route`` applies; other routes keep the default."""
    retry = Retry(FIXED, per_route={"cheap": RetryPolicy(stop=stop_after_attempt(1))})
    cheap = make_call(FakeClock(), route="cheap")
    default = make_call(FakeClock(), route="default")

    with pytest.raises(ModelHTTPError):
        await run(retry, cheap, server_error())
    with pytest.raises(ModelHTTPError):
        await run(retry, default, server_error())
    assert (cheap.attempt, default.attempt) == (1, 3)


async def test_stop_conditions_compose_with_or() -> None:
    """``stop_a | stop_b`` stops at whichever comes first."""
    call = make_call(FakeClock())
    retry = Retry(RetryPolicy(stop=stop_after_attempt(5) | stop_after_attempt(2), wait=wait_fixed(0)))

    with pytest.raises(ModelHTTPError):
        await run(retry, call, server_error())
    assert call.attempt == 2


async def test_waits_compose_with_plus() -> None:
    """``wait_a + wait_b`` sleeps the sum: 1 s fixed plus 0, 2, 4 s incrementing."""
    clock = FakeClock()
    retry = Retry(RetryPolicy(stop=stop_after_attempt(4), wait=wait_fixed(1) + wait_incrementing(start=0, increment=2)))

    with pytest.raises(ModelHTTPError):
        await run(retry, make_call(clock), server_error())
    assert clock.sleeps == [1.0, 3.0, 5.0]


async def test_stop_after_delay_is_measured_on_the_calls_clock() -> None:
    """``stop_after_delay`` counts the call's clock from the first attempt: 2 s attempts, 1 s waits, 3 s limit → two."""
    clock = FakeClock()
    call = make_call(clock)

    async def slow_failure(call: Call) -> str:
        clock.advance(2.0)
        raise server_error()

    retry = Retry(RetryPolicy(stop=stop_after_attempt(10) | stop_after_delay(3), wait=wait_fixed(1)))

    with pytest.raises(ModelHTTPError):
        await retry(call, slow_failure)
    assert call.attempt == 2
    assert clock.sleeps == [1.0]


async def test_stop_after_delay_counts_the_first_attempt() -> None:
    """On the real clock, a first attempt that alone outlasts ``stop_after_delay`` is not retried."""
    call = Call(event=None)

    async def slow_failure(call: Call) -> str:
        await asyncio.sleep(0.03)
        raise server_error()

    retry = Retry(RetryPolicy(stop=stop_after_attempt(5) | stop_after_delay(0.02), wait=wait_fixed(0)))

    with pytest.raises(ModelHTTPError):
        await retry(call, slow_failure)
    assert call.attempt == 1


async def test_retry_on_predicate_replaces_the_default() -> None:
    """A custom ``retry_on`` decides what is retried, here a ``ValueError`` but not a 503."""
    retry = Retry(RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(0), retry_on=lambda e: type(e) is ValueError))
    call = make_call(FakeClock())
    assert await run(retry, call, ValueError("flaky"), "ok") == "ok"
    assert call.attempt == 2

    call = make_call(FakeClock())
    with pytest.raises(ModelHTTPError):
        await run(retry, call, server_error(), "ok")
    assert call.attempt == 1


async def test_attempt_counter_restarts_for_each_invocation() -> None:
    """``call.attempt`` counts the attempts of the current invocation, so each candidate starts at one."""
    call = make_call(FakeClock())
    retry = Retry(FIXED)

    await run(retry, call, server_error(), "ok")
    assert call.attempt == 2
    await run(retry, call, "ok")
    assert call.attempt == 1


async def test_default_policy_makes_three_attempts_with_bounded_backoff() -> None:
    """Out of the box: three attempts in all, each wait between 0 and 8.5 seconds."""
    clock = FakeClock()
    call = make_call(clock)

    with pytest.raises(ModelHTTPError):
        await run(Retry(), call, server_error())
    assert call.attempt == 3
    assert len(clock.sleeps) == 2
    assert all(0.0 <= s <= 8.5 for s in clock.sleeps)


def test_wait_retry_after_rejects_a_negative_cap() -> None:
    """A negative cap on ``retry_after`` is a configuration error."""
    with pytest.raises(ValueError, match="cap"):
        wait_retry_after(wait_fixed(1), cap=-1.0)


def test_policy_rejects_a_negative_max_retry_after() -> None:
    """A negative ``max_retry_after`` fails when the policy is built, not at the first retry of some event."""
    with pytest.raises(ValueError, match=r"max_retry_after|cap"):
        RetryPolicy(max_retry_after=-1.0)


async def test_no_in_process_retries_when_the_call_may_not_retry() -> None:
    """A call marked ``may_retry=False`` (a redelivered message) gets exactly one attempt per candidate."""
    clock = FakeClock()
    call = Call(event=None, clock=clock, may_retry=False)
    attempts = 0

    async def failing(call: Call) -> str:
        nonlocal attempts
        attempts += 1
        raise TimeoutError("transient")

    with pytest.raises(TimeoutError):
        await Retry()(call, failing)
    assert attempts == 1
    assert clock.sleeps == []
    assert [d.kind for d in call.decisions] == []
