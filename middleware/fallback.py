"""Fallback: walks the route's candidates in order, then the heuristic; otherwise one error with every cause."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from stanchion.middleware.call import Call
from stanchion.middleware.errors import AllCandidatesFailed, DeadlineExceeded, NoCandidates, describe, failure_kind
from stanchion.middleware.stack import Next

R = TypeVar("R")

log = structlog.get_logger("stanchion.fallback")


@dataclass(frozen=True)
class Fallback(Generic[R]):
    """Tries ``call.candidates`` in order; any failure that reaches it moves on to the next.

    By the time a failure reaches Fallback, Retry has given up on it (or it was permanent, or the
    circuit was open). After the last candidate the heuristic answers if the route allows one, and
    the call is marked degraded. With nothing left, raises ``AllCandidatesFailed``.

    Args:
        heuristic: The non-LLM answer of last resort, called with the call.
        heuristic_name: What ``call.served_by`` says when the heuristic answered.
    """

    heuristic: Callable[[Call], Awaitable[R]] | None = None
    heuristic_name: str = "heuristic"

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        errors: list[Exception] = []
        for candidate in call.candidates:
            remaining = call.remaining()
            if remaining is not None and remaining <= 0:
                errors.append(DeadlineExceeded(call.timeout))
                call.decide("fallback", "deadline spent; skipping the remaining candidates", model=candidate.name)
                break
            call.candidate = candidate
            call.models_tried.append(candidate.name)
            try:
                result = await call_next(call)
            except Exception as exc:
                errors.append(exc)
                kind = failure_kind(exc).value
                call.decide("fallback", describe(exc), model=candidate.name, failure=kind)
                log.info("candidate failed", candidate=candidate.name, failure=kind, error=describe(exc))
                continue
            call.served_by = candidate.name
            return result
        call.candidate = None
        if self.heuristic is not None and call.allow_heuristic:
            call.decide(
                "degraded",
                f"{len(errors)} candidate(s) failed; the heuristic answers",
                model=self.heuristic_name,
            )
            log.warning("degraded: the heuristic answers", route=call.route, failed=len(errors))
            result = await self.heuristic(call)
            call.served_by = self.heuristic_name
            call.degraded = True
            return result
        if not errors:
            raise NoCandidates(f"route {call.route!r} has no candidates and allows no heuristic")
        raise AllCandidatesFailed(f"all {len(errors)} candidate(s) of route {call.route!r} failed", errors)
