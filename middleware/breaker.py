"""CircuitBreaker: an explicit state machine per candidate — closed, open, half-open, forced open, disabled."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from stanchion.middleware.breaker_store import (
    BreakerRecord,
    BreakerState,
    BreakerStore,
    InMemoryBreakerStore,
    ProbeLease,
    SharedBreakerStore,
)
from stanchion.middleware.call import Call
from stanchion.middleware.clock import SYSTEM_CLOCK, Clock
from stanchion.middleware.errors import CircuitOpenError, is_transient
from stanchion.middleware.stack import Next

R = TypeVar("R")

Transition = Callable[[str, BreakerState, BreakerState], None]
"""Called with (key, old state, new state) on every state change."""

MIN_PROBE_LEASE_S = 1.0
"""The shortest default probe lease (``open_for`` may be 0)."""


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker trips and how it recovers.

    Args:
        consecutive_failures: Trip after this many failures in a row.
        failure_rate: Trip when the failure rate over the window reaches this (0-1)...
        window: ...counted over the last ``window`` calls...
        min_calls: ...once at least ``min_calls`` are in the window.
        open_for: Seconds to stay open before letting probes through.
        half_open_probes: Probes allowed at once while half-open (across every replica sharing the store); this
            many successes close it.
        counts: Which failures count toward tripping (default: transient ones).
        probe_lease: Seconds a probe holds its slot; after that the slot is free for another probe, so a replica
            that died mid-probe cannot keep the breaker half-open. Default: ``open_for`` (at least 1 s), which the
            attempt timeout inside the breaker keeps a live probe under with the default settings (20 s < 30 s);
            a vanished probe then costs one more open period, as a failed one does.
    """

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    open_for: float = 30.0
    half_open_probes: int = 1
    counts: Callable[[BaseException], bool] = is_transient
    probe_lease: float | None = None

    @property
    def lease(self) -> float:
        """Seconds a probe holds its slot."""
        return self.probe_lease if self.probe_lease is not None else max(self.open_for, MIN_PROBE_LEASE_S)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate}")
        if self.window < 1 or not 1 <= self.min_calls <= self.window:
            raise ValueError(f"need 1 <= min_calls <= window, got min_calls={self.min_calls}, window={self.window}")
        if not self.open_for >= 0:  # also refuses NaN
            raise ValueError(f"open_for must be >= 0, got {self.open_for}")
        if self.half_open_probes < 1:
            raise ValueError(f"half_open_probes must be >= 1, got {self.half_open_probes}")
        if self.probe_lease is not None and not self.probe_lease > 0:
            raise ValueError(f"probe_lease must be > 0, got {self.probe_lease}")


@dataclass(frozen=True)
class CircuitBreaker:
    """Rejects calls to a candidate whose recent calls failed, until a probe shows it has recovered.

    Keyed by ``call.candidate.name``, within ``scope`` when one is given (the store key is then
    ``"<scope>/<name>"``). State lives in ``store`` (shared by every event, and by replicas when the store is
    shared); time comes from ``clock``'s wall time (records may be read on other hosts). Methods taking a ``name``
    take the candidate's name.

    With a ``SharedBreakerStore``, a change another replica makes to a key this breaker has used reaches
    ``on_transition`` too (as does, on first use, a key found in a state other than closed).

    A stack may hold two: one counting transient failures (the provider's health, keyed by model and shared by
    every handler), and one counting invalid output (``counts=is_invalid_output``, scoped by handler, since
    what is valid depends on the handler's schema).

    Args:
        policy: Default policy.
        per_candidate: Policies for named candidates.
        store: Breaker state.
        clock: Time source.
        on_transition: Listeners told about every state change (with the store key).
        scope: Prefix of the store keys (e.g. the handler's name).
        label: What this breaker watches (e.g. ``"output quality"``), in its decisions.
    """

    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    per_candidate: Mapping[str, BreakerPolicy] = field(default_factory=dict)
    store: BreakerStore = field(default_factory=InMemoryBreakerStore)
    clock: Clock = SYSTEM_CLOCK
    on_transition: Sequence[Transition] = ()
    scope: str = ""
    label: str = ""
    _seen: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.store, SharedBreakerStore):
            self.store.listen(self._remote)

    def key(self, name: str) -> str:
        """The store key of candidate ``name``."""
        return f"{self.scope}/{name}" if self.scope else name

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        name = call.candidate.name if call.candidate else "default"
        key = self.key(name)
        policy = self.per_candidate.get(name, self.policy)
        now = self.clock.wall()
        old, new, probe = await self.store.update(key, lambda rec: self._acquire(rec, policy, now))
        self._see(key, old)
        self._changed(call, key, old, new)
        if new.state in (BreakerState.OPEN, BreakerState.FORCED_OPEN) or (
            new.state is BreakerState.HALF_OPEN and probe is None
        ):
            # Half-open with every probe slot taken: retry_in is past; say "now-ish", never a negative wait.
            retry_in = None if new.state is BreakerState.FORCED_OPEN else max(0.0, _retry_in(new, policy, now))
            call.decide("breaker", "rejected", model=name, state=new.state.value, retry_in_s=retry_in, **self._of())
            raise CircuitOpenError(key, retry_in, new.state.value)
        try:
            result = await call_next(call)
        except BaseException as exc:
            failed = isinstance(exc, Exception) and policy.counts(exc)
            await self._record(call, key, policy, probe, failed=failed, released=not failed)
            raise
        await self._record(call, key, policy, probe, failed=False, released=False)
        return result

    async def rejecting_for(self, name: str) -> float | None:
        """Seconds until ``name`` may admit a call again while it rejects (0 when half-open, ``inf`` when forced
        open); ``None`` when it admits calls now."""
        rec = await self.store.get(self.key(name))
        self._see(self.key(name), rec)
        if rec.state is BreakerState.FORCED_OPEN:
            return float("inf")
        if rec.state is BreakerState.HALF_OPEN:
            return 0.0
        if rec.state is BreakerState.OPEN:
            return max(0.0, _retry_in(rec, self.per_candidate.get(name, self.policy), self.clock.wall()))
        return None

    async def state(self, name: str) -> BreakerState:
        """The current state of one breaker."""
        return (await self.store.get(self.key(name))).state

    async def force_open(self, name: str) -> None:
        """Reject every call to ``name`` until ``reset``."""
        await self._set(name, BreakerRecord(state=BreakerState.FORCED_OPEN))

    async def disable(self, name: str) -> None:
        """Let every call to ``name`` through and stop counting, until ``reset``."""
        await self._set(name, BreakerRecord(state=BreakerState.DISABLED))

    async def reset(self, name: str) -> None:
        """Back to closed with an empty window."""
        await self._set(name, BreakerRecord())

    def _see(self, key: str, rec: BreakerRecord) -> None:
        """Note a key this breaker uses; with a shared store, tell the listeners a state set elsewhere."""
        if key in self._seen:
            return
        self._seen.add(key)
        if rec.state is not BreakerState.CLOSED and isinstance(self.store, SharedBreakerStore):
            for listener in self.on_transition:
                listener(key, BreakerState.CLOSED, rec.state)

    def _remote(self, key: str, old: BreakerRecord, new: BreakerRecord) -> None:
        """Another replica changed ``key`` (through the shared store): tell the listeners, for a key used here."""
        if key in self._seen and old.state is not new.state:
            for listener in self.on_transition:
                listener(key, old.state, new.state)

    def _of(self) -> dict[str, str]:
        return {"breaker": self.label} if self.label else {}

    async def _set(self, name: str, record: BreakerRecord) -> None:
        key = self.key(name)
        old = await self.store.update(key, lambda rec: (replace(record, version=rec.version + 1), rec))
        self._seen.add(key)
        if old.state is not record.state:
            for listener in self.on_transition:
                listener(key, old.state, record.state)

    def _acquire(
        self, rec: BreakerRecord, policy: BreakerPolicy, now: float
    ) -> tuple[BreakerRecord, tuple[BreakerRecord, BreakerRecord, ProbeLease | None]]:
        new = rec
        if rec.state is BreakerState.OPEN and _retry_in(rec, policy, now) <= 0:
            new = replace(rec, state=BreakerState.HALF_OPEN, probes=(), probe_successes=0)
        probe = None
        if new.state is BreakerState.HALF_OPEN:
            live = tuple(p for p in new.probes if p.expires_at > now)  # an expired lease frees its slot
            if len(live) < policy.half_open_probes:
                probe = ProbeLease(os.urandom(8).hex(), now + policy.lease)
                new = replace(new, probes=(*live, probe))
        new = replace(new, version=rec.version + 1) if new is not rec else rec
        return new, (rec, new, probe)

    async def _record(
        self, call: Call, key: str, policy: BreakerPolicy, probe: ProbeLease | None, *, failed: bool, released: bool
    ) -> None:
        now = self.clock.wall()

        def change(rec: BreakerRecord) -> tuple[BreakerRecord, tuple[BreakerRecord, BreakerRecord]]:
            new = _after(rec, policy, now, probe=probe, failed=failed, released=released)
            if new is rec:  # nothing changed (the common case): keep the record as it is
                return rec, (rec, rec)
            return replace(new, version=rec.version + 1), (rec, new)

        old, new = await self.store.update(key, change)
        self._changed(call, key, old, new)

    def _changed(self, call: Call, key: str, old: BreakerRecord, new: BreakerRecord) -> None:
        if old.state is new.state:
            return
        name = call.candidate.name if call.candidate else key
        call.decide(
            "breaker", f"{old.state.value} -> {new.state.value}", model=name, state=new.state.value, **self._of()
        )
        for listener in self.on_transition:
            listener(key, old.state, new.state)


def _steady(rec: BreakerRecord, policy: BreakerPolicy) -> bool:
    """Closed with a full window of successes: one more success would change nothing."""
    return (
        rec.state is BreakerState.CLOSED
        and rec.consecutive_failures == 0
        and len(rec.outcomes) == policy.window
        and not any(rec.outcomes)
    )


def _retry_in(rec: BreakerRecord, policy: BreakerPolicy, now: float) -> float:
    opened = now if rec.opened_at is None else rec.opened_at
    return opened + policy.open_for - now


def _after(
    rec: BreakerRecord, policy: BreakerPolicy, now: float, *, probe: ProbeLease | None, failed: bool, released: bool
) -> BreakerRecord:
    """The record after one call finished. ``released``: it failed in a way that doesn't count."""
    if rec.state in (BreakerState.DISABLED, BreakerState.FORCED_OPEN):
        return rec
    if rec.state is BreakerState.HALF_OPEN:
        if probe is None or probe not in rec.probes:
            # Admitted before the breaker opened and finishing late, or a probe whose lease another took over (or of
            # an earlier half-open period): not this period's probe, ignore it.
            return rec
        if failed:
            return BreakerRecord(state=BreakerState.OPEN, opened_at=now)
        others = tuple(p for p in rec.probes if p != probe)
        if released:
            return replace(rec, probes=others)
        successes = rec.probe_successes + 1
        if successes >= policy.half_open_probes:
            return BreakerRecord()
        return replace(rec, probes=others, probe_successes=successes)
    if rec.state is BreakerState.OPEN:
        return rec
    if released or (not failed and _steady(rec, policy)):
        return rec
    outcomes = (*rec.outcomes, failed)[-policy.window :]
    consecutive = rec.consecutive_failures + 1 if failed else 0
    rate_trips = len(outcomes) >= policy.min_calls and sum(outcomes) / len(outcomes) >= policy.failure_rate
    if failed and (consecutive >= policy.consecutive_failures or rate_trips):
        return BreakerRecord(state=BreakerState.OPEN, opened_at=now)
    return replace(rec, consecutive_failures=consecutive, outcomes=outcomes)
