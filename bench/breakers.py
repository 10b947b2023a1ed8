"""Shared breakers (issue 15): how fast a trip reaches another replica, and what the KV store costs per event.

Both in this process, on the suite's nats-server over loopback, each "replica" a ``KeyValueBreakerStore`` on a
connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client

from bench.harness import Report, interleave, median, percentile, spread
from stanchion.handlers.nats.breakers import KeyValueBreakerStore
from stanchion.middleware import (
    BreakerPolicy,
    BreakerState,
    BreakerStore,
    Call,
    Candidate,
    CircuitBreaker,
    InMemoryBreakerStore,
)

_buckets = itertools.count()


class _Failure(Exception):
    """What the failing calls raise (counted by the breakers below)."""


async def _connect(url: str) -> Client:
    return await nats.connect(url)


def _store(connection: Client, bucket: str) -> KeyValueBreakerStore:
    return KeyValueBreakerStore(lambda: connection, bucket)


async def propagation(url: str, trips: int) -> tuple[list[float], list[float]]:
    """``trips`` times: a call failing on A trips A's breaker; milliseconds until B's listener hears of it, and
    until A's write was confirmed. B's reset is awaited the same way before the next trip."""
    bucket = f"bench_breakers_{next(_buckets)}"
    a_conn, b_conn = await _connect(url), await _connect(url)
    a, b = _store(a_conn, bucket), _store(b_conn, bucket)
    await a.start()
    await b.start()
    heard: asyncio.Queue[tuple[BreakerState, float]] = asyncio.Queue()
    policy = BreakerPolicy(consecutive_failures=1, counts=lambda exc: isinstance(exc, _Failure))
    breaker_a = CircuitBreaker(policy, store=a)
    breaker_b = CircuitBreaker(
        policy, store=b, on_transition=[lambda key, old, new: heard.put_nowait((new, time.perf_counter()))]
    )
    call = Call(event=None)
    call.candidate = Candidate("primary")

    async def ok(call: Call) -> str:
        return "ok"

    async def fail(call: Call) -> str:
        raise _Failure

    await breaker_b(call, ok)  # B uses the key: its listeners hear of changes to it
    seen, written = [], []
    try:
        for _ in range(trips):
            started = time.perf_counter()
            with contextlib.suppress(_Failure):
                await breaker_a(call, fail)
            written.append((time.perf_counter() - started) * 1000)
            state, at = await asyncio.wait_for(heard.get(), 5.0)
            assert state is BreakerState.OPEN
            seen.append((at - started) * 1000)
            await breaker_a.reset("primary")
            state, _ = await asyncio.wait_for(heard.get(), 5.0)
            assert state is BreakerState.CLOSED
    finally:
        await a.aclose()
        await b.aclose()
        await a_conn.close()
        await b_conn.close()
    return seen, written


async def per_event(store: BreakerStore, n: int, failing: Callable[[int], bool]) -> float:
    """Microseconds per event through the two breakers of a handler's stack (provider health, output quality) on
    ``store``, calls one after another, the call failing when ``failing(i)``."""
    policy = BreakerPolicy(
        consecutive_failures=1_000_000, failure_rate=1.0, window=20, min_calls=20, counts=lambda e: True
    )
    health = CircuitBreaker(policy, store=store)
    quality = CircuitBreaker(policy, store=store, scope="bench")
    call = Call(event=None)
    call.candidate = Candidate("primary")

    async def answer(call: Call) -> str:
        return "ok"

    async def inner(call: Call) -> str:
        return await quality(call, answer)

    async def fail(call: Call) -> str:
        raise _Failure

    async def inner_failing(call: Call) -> str:
        return await quality(call, fail)

    for _ in range(40):  # a full window of successes: the steady state
        await health(call, inner)
    started = time.perf_counter()
    for i in range(n):
        with contextlib.suppress(_Failure):
            await health(call, inner_failing if failing(i) else inner)
    return (time.perf_counter() - started) / n * 1e6


async def _on_kv(url: str, run: Callable[[BreakerStore], Awaitable[float]]) -> float:
    connection = await _connect(url)
    store = _store(connection, f"bench_breakers_{next(_buckets)}")
    await store.start()
    try:
        return await run(store)
    finally:
        await store.aclose()
        await connection.close()


async def shared_breakers(url: str, *, quick: bool) -> Report:
    report = Report(
        "Shared breakers",
        "Two `KeyValueBreakerStore`s (one per replica, each on its own connection) on one bucket of the suite's "
        "nats-server, in the benchmark process. Propagation: a call failing on replica A trips A's breaker "
        "(one failure trips it); the time from the start of that call until replica B's `on_transition` listener "
        "hears of it (A's compare-and-set write, then B's watch), then a reset heard the same way before the next "
        "trip. Cost per event: one event through a handler's two breakers (provider health and output quality, "
        "one store), calls one after another, in-memory store vs the KV store, in the steady state (healthy, "
        "a full window of successes: nothing to write) and in the worst case (every other call fails, so every "
        "call changes the window and is written).",
    )
    trips = 50 if quick else 200
    seen, written = await propagation(url, trips)
    report.add(
        "trip seen by the other replica, p50 (ms)",
        f"{median(seen):.2f}",
        "≤ 100 ms",
        median(seen) <= 100,
        detail=f"{trips} trips; p99 {percentile(seen, 0.99):.2f} ms",
    )
    report.add("trip seen by the other replica, max (ms)", f"{max(seen):.2f}", "≤ 100 ms", max(seen) <= 100)
    report.add("the trip's write confirmed, p50 (ms)", f"{median(written):.2f}", detail=f"max {max(written):.2f} ms")

    rounds, n, n_written = (2, 5_000, 500) if quick else (5, 20_000, 2_000)

    def healthy(i: int) -> bool:
        return False

    def alternating(i: int) -> bool:
        return i % 2 == 1

    values = await interleave(
        [
            ("memory, healthy", lambda: per_event(InMemoryBreakerStore(), n, healthy)),
            ("KV, healthy", lambda: _on_kv(url, lambda s: per_event(s, n, healthy))),
            ("memory, every call written", lambda: per_event(InMemoryBreakerStore(), n_written, alternating)),
            ("KV, every call written", lambda: _on_kv(url, lambda s: per_event(s, n_written, alternating))),
        ],
        rounds,
    )
    for name, vals in values.items():
        report.add(f"{name} (µs per event)", f"{median(vals):.1f}", detail=f"rounds [{spread(vals)}]")
    steady = median(values["KV, healthy"]) - median(values["memory, healthy"])
    kv, memory = values["KV, healthy"], values["memory, healthy"]
    overlap = "within" if min(kv) <= max(memory) and min(memory) <= max(kv) else "outside"
    write_cost = median(values["KV, every call written"]) - median(values["memory, every call written"])
    report.notes.append(
        f"Healthy, the shared store costs {steady:+.1f} µs per event over the in-memory one ({overlap} the ranges "
        "of the rounds): reads are local and nothing is written. A change of a record is one compare-and-set round "
        "trip: "
        f"{write_cost:.0f} µs per event in the worst case, two writes (both breakers count every failure here), about "
        f"{write_cost / 2:.0f} µs each. A real handler's failure (a transient one) is counted by the health breaker "
        "only; while its window holds a failure, each call after it slides the window and is written too. A "
        "single replica (`STANCHION_REPLICAS=1`, `STANCHION_BREAKER_STORE=auto`) uses the in-memory store."
    )
    return report
