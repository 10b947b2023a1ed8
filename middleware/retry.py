"""Retry: transient failures of one candidate, on tenacity, bounded by attempts and the deadline."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar, cast

from tenacity import (
    AsyncRetrying,
    DoAttempt,
    DoSleep,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from stanchion.middleware.call import Call
from stanchion.middleware.errors import describe, failure_kind, is_transient, wait_hint
from stanchion.middleware.stack import Next

R = TypeVar("R")


class wait_retry_after(wait_base):
    """Wait what the provider asked for (``Retry-After``), capped at ``cap``; else fall back to ``otherwise``."""

    def __init__(self, otherwise: wait_base, cap: float = 30.0) -> None:
        if cap < 0:
            raise ValueError(f"cap must be >= 0, got {cap}")
        self.otherwise = otherwise
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = wait_hint(exc) if exc is not None else None
        if hint is not None:
            return min(max(hint, 0.0), self.cap)
        return self.otherwise(retry_state)


class stop_at_deadline(stop_base):
    """Stop when the next sleep would end past the event's deadline: no point waiting to be too late."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def __call__(self, retry_state: RetryCallState) -> bool:
        remaining = self.call.remaining()
        return remaining is not None and retry_state.upcoming_sleep >= remaining


@dataclass(frozen=True)
class RetryPolicy:
    """How one route retries. Takes tenacity's own objects, so they compose with ``|`` and ``+``.

    Args:
        stop: When to give up (default: 3 attempts in all). The deadline always applies as well.
        wait: Backoff between attempts (default: exponential with jitter, 0.5 s doubling to 8 s).
        max_retry_after: Cap on a provider's ``Retry-After`` in seconds; longer asks are cut to this.
        retry_on: Which failures to retry (default: transient ones only).
    """

    stop: stop_base = field(default_factory=lambda: stop_after_attempt(3))
    wait: wait_base = field(default_factory=lambda: wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5))
    max_retry_after: float = 30.0
    retry_on: Callable[[BaseException], bool] = is_transient

    def __post_init__(self) -> None:
        if not self.max_retry_after >= 0:  # also refuses NaN
            raise ValueError(f"max_retry_after must be >= 0 seconds, got {self.max_retry_after}")


@dataclass(frozen=True)
class Retry:
    """Retries the rest of the stack on transient failures, recording each retry in ``call.decisions``.

    Args:
        policy: The default policy.
        per_route: Policies for named routes (``call.route``), overriding the default.
    """

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    per_route: Mapping[str, RetryPolicy] = field(default_factory=dict)

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        policy = self.per_route.get(call.route, self.policy)
        # Happy path: one attempt, no tenacity machinery. On the first retryable failure, tenacity takes
        # over with that failure as attempt 1, so stop/wait strategies see the same attempt numbers.
        call.attempt = 1
        if not call.may_retry:
            return await call_next(call)
        started = call.clock.now()
        try:
            return await call_next(call)
        except Exception as exc:
            if not policy.retry_on(exc):
                raise
            first = exc
        return await self._retry(call, call_next, policy, first, started)

    async def _retry(self, call: Call, call_next: Next[R], policy: RetryPolicy, first: Exception, started: float) -> R:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            call.decide(
                "retry",
                describe(exc) if exc else "",
                attempt=state.attempt_number,
                failure=failure_kind(exc).value if exc else "",
                wait_s=round(state.upcoming_sleep, 3),
            )

        retrying = AsyncRetrying(
            stop=policy.stop | stop_at_deadline(call),
            wait=wait_retry_after(policy.wait, policy.max_retry_after),
            retry=retry_if_exception(policy.retry_on),
            sleep=call.clock.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        retrying.begin()
        state = RetryCallState(retry_object=retrying, fn=None, args=(), kwargs={})
        state.set_exception((type(first), first, first.__traceback__))
        # tenacity times stop_after_delay & co. with time.monotonic; give it the call's clock, from attempt 1.
        state.start_time, state.outcome_timestamp = started, call.clock.now()
        # The loop of tenacity's own AsyncRetrying.__call__, entered after the first attempt.
        while True:
            action = await retrying.iter(retry_state=state)
            if isinstance(action, DoAttempt):
                call.attempt = state.attempt_number
                try:
                    result = await call_next(call)
                except BaseException:
                    state.set_exception(sys.exc_info())  # type: ignore[arg-type]
                else:
                    state.set_result(result)
                state.outcome_timestamp = call.clock.now()
            elif isinstance(action, DoSleep):
                state.prepare_for_next_attempt()
                await call.clock.sleep(float(action))
            else:
                return cast("R", action)
