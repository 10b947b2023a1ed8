"""Where breaker state lives: one record per key, updated atomically through a small interface."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

T = TypeVar("T")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


@dataclass(frozen=True)
class BreakerRecord:
    """The state of one breaker. Immutable: stores swap whole records, which keeps updates atomic.

    ``outcomes`` is the sliding window of recent call results (``True`` = failure), newest last.
    """

    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    outcomes: tuple[bool, ...] = ()
    opened_at: float | None = None
    probes_in_flight: int = 0
    probe_successes: int = 0
    version: int = field(default=0, compare=False)


class BreakerStore(Protocol):
    """Atomic read-modify-write of breaker records, keyed by candidate."""

    async def update(self, key: str, change: Callable[[BreakerRecord], tuple[BreakerRecord, T]]) -> T:
        """Apply ``change`` to the current record of ``key`` atomically; store its new record, return its value."""
        ...

    async def get(self, key: str) -> BreakerRecord: ...


class InMemoryBreakerStore:
    """Breaker state for one process (one event loop). Safe under asyncio concurrency."""

    def __init__(self) -> None:
        self._records: dict[str, BreakerRecord] = {}

    async def get(self, key: str) -> BreakerRecord:
        return self._records.get(key, BreakerRecord())

    async def update(self, key: str, change: Callable[[BreakerRecord], tuple[BreakerRecord, T]]) -> T:
        # ``change`` is synchronous and nothing here awaits, so read-modify-write cannot interleave with
        # another task on the same event loop: no lock needed.
        record, value = change(self._records.get(key, BreakerRecord()))
        self._records[key] = record
        return value
