"""Bulkhead: at most N calls at once to a candidate, so that a server with few slots queues nothing unseen."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TypeVar

from stanchion.middleware.call import Call
from stanchion.middleware.errors import DeadlineExceeded
from stanchion.middleware.stack import Next

R = TypeVar("R")


class Bulkhead:
    """Limits the calls in flight per candidate (in this process); a call over the limit waits for a slot.

    Put it inside the circuit breakers (a half-open probe may wait for a slot) and outside ``Observe`` and
    ``Timeout``: the attempt's latency and its timeout then measure the model, not this queue. A call waits at
    most until its event's deadline (then ``DeadlineExceeded``, not held against the candidate); what it waited is
    a ``bulkhead`` decision and ``call.slot_wait_s``. Candidates without a limit pass straight through.

    One instance may serve several stacks (every handler of a process calling the same server): limits are set
    per candidate name with ``limit``.

    Args:
        limits: Calls allowed at once, by candidate name.
    """

    def __init__(self, limits: Mapping[str, int] | None = None) -> None:
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._held: dict[str, int] = {}
        self.limits: dict[str, int] = {}
        for name, n in (limits or {}).items():
            self.limit(name, n)

    def limit(self, name: str, calls: int) -> None:
        """Allow ``calls`` at once to ``name`` (the lowest limit wins when several stacks set one)."""
        if calls < 1:
            raise ValueError(f"bulkhead of {name!r}: need at least 1 call at once, got {calls}")
        if name not in self.limits or calls < self.limits[name]:
            self.limits[name] = calls
            self._slots[name] = asyncio.Semaphore(calls)

    def in_use(self, name: str) -> int:
        """Calls to ``name`` holding a slot now."""
        return self._held.get(name, 0)

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        name = call.candidate.name if call.candidate else ""
        slots = self._slots.get(name)
        call.slot_wait_s = 0.0
        if slots is None:
            return await call_next(call)
        if slots.locked():
            await self._wait(call, slots, name)
        else:
            await slots.acquire()  # a free slot: taken without suspending
        self._held[name] = self._held.get(name, 0) + 1
        try:
            return await call_next(call)
        finally:
            self._held[name] -= 1
            slots.release()

    async def _wait(self, call: Call, slots: asyncio.Semaphore, name: str) -> None:
        started = call.clock.now()
        remaining = call.remaining()
        try:
            async with asyncio.timeout(remaining):
                await slots.acquire()
        except TimeoutError:
            waited = call.clock.now() - started
            call.decide(
                "bulkhead", f"deadline spent waiting {waited:.3g}s for a slot", limit=self.limits[name], waited_s=waited
            )
            raise DeadlineExceeded(call.timeout) from None
        call.slot_wait_s = waited = call.clock.now() - started
        call.decide(
            "bulkhead",
            f"waited {waited:.3g}s for one of {self.limits[name]} slot(s)",
            limit=self.limits[name],
            waited_s=round(waited, 3),
        )
