"""KeyValueBreakerStore: breaker state shared by replicas through a real nats-server's KV bucket.

Each "replica" is a store on a connection of its own; breakers on them use fake clocks of their own (same wall time,
as hosts with synchronised clocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from nats.js.kv import VALID_KEY_RE
from structlog.testing import capture_logs

from stanchion.handlers.nats.breakers import (
    KeyValueBreakerStore,
    RecordError,
    decode_key,
    decode_record,
    encode_key,
    encode_record,
    read_breakers,
)
from stanchion.handlers.nats.embedded import EmbeddedNats, free_port
from stanchion.middleware import (
    BreakerPolicy,
    BreakerRecord,
    BreakerState,
    Call,
    Candidate,
    CircuitBreaker,
    CircuitOpenError,
    FakeClock,
    ProbeLease,
)
from tests.unit.fakes import Script, server_error

_buckets = itertools.count()
DOWN = "breaker bucket unavailable: breakers go on with their last known state and local counts"
BACK = "breaker bucket reachable again"
Transition = tuple[str, BreakerState, BreakerState]


async def _quiet(error: Exception) -> None:
    """nats-py's error callback: a test server going away is expected here."""


async def connect(url: str) -> Client:
    return await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, error_cb=_quiet)


@contextlib.asynccontextmanager
async def replicas(url: str, n: int = 2, bucket: str | None = None) -> AsyncIterator[list[KeyValueBreakerStore]]:
    """``n`` started stores on one bucket, each on its own connection (closed after)."""
    bucket = bucket or f"breakers_{next(_buckets)}"
    connections = [await connect(url) for _ in range(n)]
    stores = [KeyValueBreakerStore(lambda c=c: c, bucket) for c in connections]  # type: ignore[misc]
    for store in stores:
        await store.start()
    try:
        yield stores
    finally:
        for store in stores:
            await store.aclose()
        for connection in connections:
            await connection.close()


def breaker_on(
    store: KeyValueBreakerStore, clock: FakeClock, transitions: list[Transition] | None = None, **policy: Any
) -> CircuitBreaker:
    listeners = [lambda key, old, new: transitions.append((key, old, new))] if transitions is not None else []
    return CircuitBreaker(BreakerPolicy(**policy), store=store, clock=clock, on_transition=listeners)


def make_call(clock: FakeClock) -> Call:
    call = Call(event=None, clock=clock)
    call.candidate = Candidate("primary")
    return call


async def attempt(breaker: CircuitBreaker, clock: FakeClock, outcome: str | Exception) -> object:
    try:
        return await breaker(make_call(clock), Script({"primary": [outcome]}))
    except Exception as exc:
        return exc


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait (bounded) for ``condition``; fail the test when it does not come."""
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.01)


def plus_one_failure(rec: BreakerRecord) -> tuple[BreakerRecord, None]:
    return replace(rec, consecutive_failures=rec.consecutive_failures + 1), None


# -- the format --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["primary", "refund/primary", "openai:gpt-4o", "a.b", "=", "==3D", "", "ü/模型", "x y*>", "/lead", "\ud800"]
)
def test_keys_are_valid_kv_keys_and_decode_to_the_breaker_key(key: str) -> None:
    """Any breaker key (model and handler names may hold anything) makes a key KV accepts, and decodes back."""
    encoded = encode_key(key)
    assert VALID_KEY_RE.match(encoded) and not encoded.startswith(".") and not encoded.endswith(".")
    assert decode_key(encoded) == key


def test_distinct_breaker_keys_never_share_a_kv_key() -> None:
    """Escaping is injective: names differing only by an escaped character stay apart."""
    names = ["a:b", "a=3Ab", "a.b", "a=2Eb", "a_b", "a-b", "a/b"]
    assert len({encode_key(n) for n in names}) == len(names)


def test_a_record_round_trips_as_versioned_json() -> None:
    """Every field survives encoding; the value says its version."""
    record = BreakerRecord(
        state=BreakerState.HALF_OPEN,
        consecutive_failures=2,
        outcomes=(True, False, True),
        opened_at=1_700_000_123.25,
        probes=(ProbeLease("ab12", 1_700_000_153.25),),
        probe_successes=1,
    )
    assert encode_record(record).startswith(b'{"v":1,')
    assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize("data", [b'{"v":2,"state":"open"}', b"not json", b'{"v":1,"state":"ajar"}', b"[]"])
def test_a_record_of_another_version_or_shape_is_refused(data: bytes) -> None:
    """A value this version cannot read is a RecordError, never a half-read record."""
    with pytest.raises(RecordError):
        decode_record(data)


# -- sharing -----------------------------------------------------------------------------------------------


async def test_a_trip_on_one_replica_opens_the_circuit_on_another(nats_server: EmbeddedNats) -> None:
    """Replica A's trip reaches replica B through the watch: B's listeners are told, and B rejects without calling."""
    async with replicas(nats_server.url) as (a, b):
        clock_a, clock_b = FakeClock(), FakeClock()
        seen: list[Transition] = []
        breaker_a = breaker_on(a, clock_a, consecutive_failures=3)
        breaker_b = breaker_on(b, clock_b, seen, consecutive_failures=3)
        assert await attempt(breaker_b, clock_b, "ok") == "ok"  # B uses the key

        for _ in range(3):
            await attempt(breaker_a, clock_a, server_error())
        await until(lambda: bool(seen))

        assert seen == [("primary", BreakerState.CLOSED, BreakerState.OPEN)]
        rejected = await attempt(breaker_b, clock_b, "ok")  # "ok" would be the answer, were it called
        assert isinstance(rejected, CircuitOpenError) and rejected.retry_in == 30.0


async def test_failures_on_every_replica_count_toward_one_trip(nats_server: EmbeddedNats) -> None:
    """Two failures on A and one on B make three consecutive failures of the one shared breaker."""
    async with replicas(nats_server.url) as (a, b):
        clock_a, clock_b = FakeClock(), FakeClock()
        breaker_a = breaker_on(a, clock_a, consecutive_failures=3)
        breaker_b = breaker_on(b, clock_b, consecutive_failures=3)
        await attempt(breaker_a, clock_a, server_error())
        await attempt(breaker_a, clock_a, server_error())
        await until(lambda: b.records().get("primary", BreakerRecord()).consecutive_failures == 2)
        await attempt(breaker_b, clock_b, server_error())
        await until(lambda: a.records()["primary"].state is BreakerState.OPEN)
        assert await breaker_a.state("primary") is BreakerState.OPEN


async def test_a_write_based_on_a_stale_revision_is_applied_again_to_the_fresh_record(
    nats_server: EmbeddedNats,
) -> None:
    """Another replica writes while this one's loop is busy (its watch cannot have seen it): the compare-and-set
    fails, and the change is applied to the fresh record, losing neither write."""
    async with replicas(nats_server.url, n=1) as (a,):
        await a.update("primary", plus_one_failure)

        def other_replica_sets_seven_failures() -> None:
            async def write() -> None:
                connection = await connect(nats_server.url)
                kv = await connection.jetstream().key_value(a.bucket)
                entry = await kv.get(encode_key("primary"))
                await kv.update(
                    encode_key("primary"), encode_record(BreakerRecord(consecutive_failures=7)), last=entry.revision
                )
                await connection.close()

            asyncio.run(write())

        worker = threading.Thread(target=other_replica_sets_seven_failures)
        worker.start()
        worker.join()  # blocks this event loop: A's watch delivers nothing meanwhile
        assert a.records()["primary"].consecutive_failures == 1

        await a.update("primary", plus_one_failure)

        assert a.conflicts == 1
        assert (await read_breakers(_js(a), a.bucket))["primary"].consecutive_failures == 8


async def test_concurrent_changes_on_two_replicas_are_each_counted_once(nats_server: EmbeddedNats) -> None:
    """40 increments on each of two replicas at once: 80, seen alike by both."""
    async with replicas(nats_server.url) as (a, b):
        await asyncio.gather(*(store.update("k", plus_one_failure) for _ in range(40) for store in (a, b)))
        for store in (a, b):
            await until(lambda s=store: s.records()["k"].consecutive_failures == 80)  # type: ignore[misc]
        assert (await read_breakers(_js(a), a.bucket))["k"].consecutive_failures == 80


async def test_a_new_replica_starts_from_the_shared_records(nats_server: EmbeddedNats) -> None:
    """A replica started after the trip finds the circuit open; its breaker tells its listeners on first use."""
    async with replicas(nats_server.url, n=1) as (a,):
        clock = FakeClock()
        for _ in range(2):
            await attempt(breaker_on(a, clock, consecutive_failures=2), clock, server_error())
        async with replicas(nats_server.url, n=1, bucket=a.bucket) as (late,):
            seen: list[Transition] = []
            breaker = breaker_on(late, clock, seen, consecutive_failures=2)
            assert isinstance(await attempt(breaker, clock, "ok"), CircuitOpenError)
            assert seen == [("primary", BreakerState.CLOSED, BreakerState.OPEN)]


# -- probes ------------------------------------------------------------------------------------------------


async def test_one_probe_in_the_whole_deployment_and_a_dead_holders_lease_expires(nats_server: EmbeddedNats) -> None:
    """Half-open: A's probe takes the one slot, so B is rejected; A dies mid-probe; once the lease (the open
    period) has passed, B's call is the probe, and its success closes the breaker for both."""
    async with replicas(nats_server.url) as (a, b):
        clock_a, clock_b = FakeClock(), FakeClock()
        breaker_a = breaker_on(a, clock_a, consecutive_failures=1, open_for=10.0)
        breaker_b = breaker_on(b, clock_b, consecutive_failures=1, open_for=10.0)
        await attempt(breaker_a, clock_a, server_error())
        clock_a.advance(10.0)
        clock_b.advance(10.0)
        entered = asyncio.Event()

        async def hang(call: Call) -> str:
            entered.set()
            await asyncio.Event().wait()
            return "never"

        probe = asyncio.create_task(breaker_a(make_call(clock_a), hang))
        await entered.wait()
        await until(lambda: b.records()["primary"].state is BreakerState.HALF_OPEN)
        rejected = await attempt(breaker_b, clock_b, "ok")
        assert isinstance(rejected, CircuitOpenError) and rejected.state == "half_open"

        await a.aclose()  # A is gone: its probe never reports
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        assert len(b.records()["primary"].probes) == 1  # the slot is still taken in the bucket

        clock_b.advance(9.9)
        assert isinstance(await attempt(breaker_b, clock_b, "ok"), CircuitOpenError)
        clock_b.advance(0.1)
        assert await attempt(breaker_b, clock_b, "ok") == "ok"
        assert await breaker_b.state("primary") is BreakerState.CLOSED
        assert (await read_breakers(_js(b), b.bucket))["primary"].state is BreakerState.CLOSED


# -- the bucket away ---------------------------------------------------------------------------------------


async def test_bucket_deleted_breakers_keep_their_state_it_is_logged_once_and_recreated(
    nats_server: EmbeddedNats,
) -> None:
    """The bucket deleted under an open breaker: calls are still rejected, one warning, the bucket is created again
    holding the open record, and later changes are shared again."""
    async with replicas(nats_server.url) as (a, b):
        clock = FakeClock()
        breaker = breaker_on(a, clock, consecutive_failures=1)
        await attempt(breaker, clock, server_error())
        await until(lambda: "primary" in b.records())
        js = _js(a)
        with capture_logs() as logs:
            await js.delete_key_value(a.bucket)
            assert isinstance(await attempt(breaker, clock, "ok"), CircuitOpenError)
            await until(lambda: a.outages == 1 and a.online and b.online)
            assert isinstance(await attempt(breaker, clock, "ok"), CircuitOpenError)
            stored = await read_breakers(js, a.bucket)
            await a.update("other", plus_one_failure)
            await until(lambda: "other" in b.records())

    assert stored["primary"].state is BreakerState.OPEN
    mine = [e["event"] for e in logs if e.get("bucket") == a.bucket and e["log_level"] != "debug"]
    assert mine.count(DOWN) == 2  # once per replica
    assert 1 <= mine.count("recreated the missing breaker bucket") <= 2  # each that found it missing
    assert set(mine) <= {DOWN, "recreated the missing breaker bucket", "breaker bucket reachable again"}


async def test_server_down_breakers_count_locally_and_catch_up_when_it_is_back(tmp_path: Path) -> None:
    """With the server gone, A counts failures locally and trips (logging once); when the server is back A writes
    what it learnt and B, which wrote nothing meanwhile, learns of the trip.

    A logs that the bucket is back only once its catch-up write is confirmed, and B can be told of that write
    first (when B's watch is back before A's recovery writes): the capture waits for A's line too."""
    server = EmbeddedNats(store_dir=tmp_path / "nats", port=free_port())
    server.start()
    try:
        async with replicas(server.url) as (a, b):
            clock = FakeClock()
            seen: list[Transition] = []
            breaker_a = breaker_on(a, clock, consecutive_failures=3)
            breaker_b = breaker_on(b, clock, seen, consecutive_failures=3)
            await attempt(breaker_b, clock, "ok")
            await attempt(breaker_a, clock, server_error())
            await until(lambda: b.records().get("primary", BreakerRecord()).consecutive_failures == 1)
            with capture_logs() as logs:
                server.kill()
                await until(lambda: not a.connection().is_connected)
                for _ in range(4):  # two more failures trip it; then rejected, still without the server
                    await attempt(breaker_a, clock, server_error())
                assert await breaker_a.state("primary") is BreakerState.OPEN and not a.online
                assert seen == []
                server.start()
                await until(lambda: bool(seen), timeout=30)
                await until(lambda: any(e["event"] == BACK and e.get("bucket") == a.bucket for e in logs))
        assert seen == [("primary", BreakerState.CLOSED, BreakerState.OPEN)]
        events = [e["event"] for e in logs if e.get("bucket") == a.bucket and e["log_level"] != "debug"]
        assert events.count(DOWN) == 1
        assert events.count(BACK) == 1
    finally:
        server.stop()


def _js(store: KeyValueBreakerStore) -> Any:
    return store.connection().jetstream()


async def test_read_breakers_of_a_missing_bucket_is_empty(nats_server: EmbeddedNats) -> None:
    """No bucket (no shared breakers yet): no records, no error."""
    connection = await connect(nats_server.url)
    try:
        with contextlib.suppress(NotFoundError):
            await connection.jetstream().delete_key_value("never_created_breakers")
        assert await read_breakers(connection.jetstream(), "never_created_breakers") == {}
    finally:
        await connection.close()
