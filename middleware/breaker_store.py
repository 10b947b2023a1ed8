"""Where breaker state lives: one record per key, updated atomically through a small interface."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


@dataclass(frozen=True)
class ProbeLease:
    """One half-open probe's slot: held by the call ``id`` until ``expires_at`` (wall-clock seconds), when it is
    free for another probe even if its holder never came back (a replica that died mid-probe)."""

    id: str
    expires_at: float


@dataclass(frozen=True)
class BreakerRecord:
    """The state of one breaker. Immutable: stores swap whole records, which keeps updates atomic.

    ``outcomes`` is the sliding window of recent call results (``True`` = failure), newest last. Times are
    wall-clock seconds (``Clock.wall``), so that every replica sharing the record reads them alike.
    """

    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    outcomes: tuple[bool, ...] = ()
    opened_at: float | None = None
    probes: tuple[ProbeLease, ...] = ()
    probe_successes: int = 0
    version: int = field(default=0, compare=False)

    @property
    def probes_in_flight(self) -> int:
        """Probe slots taken (some may have expired; the next probe frees those)."""
        return len(self.probes)


RecordListener = Callable[[str, BreakerRecord, BreakerRecord], None]
"""Called with (key, old record, new record)."""


class BreakerStore(Protocol):
    """Atomic read-modify-write of breaker records, keyed by candidate."""

    async def update(self, key: str, change: Callable[[BreakerRecord], tuple[BreakerRecord, T]]) -> T:
        """Apply ``change`` to the current record of ``key`` atomically; store its new record, return its value.

        ``change`` is synchronous and may be applied more than once (a shared store applies it again to a record
        changed elsewhere meanwhile); only its last application is stored and returned. Returning the record it was
        given (the same object) means "no change": nothing is written.
        """
        ...

    async def get(self, key: str) -> BreakerRecord: ...


@runtime_checkable
class SharedBreakerStore(BreakerStore, Protocol):
    """A store shared with other processes (replicas), which tells about the changes made there."""

    def listen(self, listener: RecordListener) -> None:
        """Call ``listener`` for every record changed by another process, as this process learns of it."""
        ...


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
