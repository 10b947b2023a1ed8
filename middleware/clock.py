"""Injected time: every middleware reads time and sleeps through a ``Clock``."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time in seconds, wall-clock time, and an async sleep that agrees with them.

    ``now`` measures local durations (deadlines, backoff, timeouts); ``wall`` is for times that another process,
    on another host, must read too (a shared breaker's ``opened_at``): a monotonic reading means nothing there.
    """

    def now(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock for tests: time moves only when told to, and ``sleep`` advances it instantly.

    Its wall time moves with ``now`` (it starts at ``wall``). Every sleep is recorded in ``sleeps`` so tests can
    assert on backoff.
    """

    def __init__(self, start: float = 1_000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._now += max(0.0, seconds)
        await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()
