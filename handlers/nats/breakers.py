"""Breaker state shared by every replica, in a NATS KV bucket: compare-and-set writes, a watch keeps each view current.

One KV entry per breaker key (``encode_key``), holding a versioned JSON record (``encode_record``). A replica
reads its own copy of every record, kept current by a KV watch, so admitting a call costs no round trip; a change
is written with ``update(key, value, last=revision)`` (``create`` for a new key) and, when another replica wrote
first, applied again to the fresh record. When the bucket cannot be reached (deleted, server down) the breakers go
on with the last known records and count locally; the store logs it once, puts the bucket back (creating it again
when it was deleted) and catches up: a record changed meanwhile is written where nobody else changed it, otherwise
the bucket's wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from stanchion.middleware.breaker_store import BreakerRecord, BreakerState, ProbeLease, RecordListener

log = structlog.get_logger("stanchion.breakers")

T = TypeVar("T")

RECORD_VERSION = 1
"""The ``v`` of the records this module writes."""

WATCH_HEARTBEAT_S = 1.0
"""The watch's idle heartbeat: two missed, nats-py re-creates its consumer (after a restart of the server)."""

WRITE_TIMEOUT_S = 2.0
"""A write (or read after a conflict) not confirmed by then counts as the bucket being unreachable: the call goes on
with local state instead of waiting for the JetStream context's own timeout."""

RECOVERY_DELAYS_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Waits between attempts to get the bucket back, the last repeated."""

STREAM_NAME_IN_USE = 10058
"""JetStream's "stream name already in use with a different configuration"."""

_SAFE = frozenset(string.ascii_letters + string.digits + "-_/")


def encode_key(key: str) -> str:
    """A KV key for a breaker key: letters, digits, ``-``, ``_`` and ``/`` kept, every other character as ``=XX``
    per UTF-8 byte (``=`` itself too, so decoding is exact; ``.`` too, a token separator in KV). ``""`` is ``=``."""
    if not key:
        return "="
    return "".join(
        char if char in _SAFE else "".join(f"={byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in key
    )


def decode_key(encoded: str) -> str:
    """The breaker key of a KV key ``encode_key`` made."""
    if encoded == "=":
        return ""
    out = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "=":
            out.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            out += encoded[i].encode("ascii")
            i += 1
    return out.decode("utf-8", "surrogatepass")


class RecordError(ValueError):
    """A KV value that is no breaker record this version can read."""


def encode_record(record: BreakerRecord) -> bytes:
    """Version 1: ``{"v": 1, "state", "consecutive_failures", "outcomes" ("0"/"1" per call, "1" a failure, newest
    last), "opened_at" (wall-clock seconds or null), "probes" ([{"id", "expires_at"}]), "probe_successes"}``."""
    doc: dict[str, Any] = {
        "v": RECORD_VERSION,
        "state": record.state.value,
        "consecutive_failures": record.consecutive_failures,
        "outcomes": "".join("1" if failed else "0" for failed in record.outcomes),
        "opened_at": record.opened_at,
        "probes": [{"id": p.id, "expires_at": p.expires_at} for p in record.probes],
        "probe_successes": record.probe_successes,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_record(data: bytes) -> BreakerRecord:
    """The record ``encode_record`` wrote; ``RecordError`` for anything else (another version included)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != RECORD_VERSION:
            raise RecordError(f"not a version {RECORD_VERSION} breaker record")
        opened_at = doc["opened_at"]
        return BreakerRecord(
            state=BreakerState(doc["state"]),
            consecutive_failures=int(doc["consecutive_failures"]),
            outcomes=tuple(c == "1" for c in str(doc["outcomes"])),
            opened_at=None if opened_at is None else float(opened_at),
            probes=tuple(ProbeLease(str(p["id"]), float(p["expires_at"])) for p in doc["probes"]),
            probe_successes=int(doc["probe_successes"]),
        )
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"unreadable breaker record: {exc}") from exc


@dataclass(frozen=True)
class _Entry:
    record: BreakerRecord
    revision: int | None
    """The KV revision the record was read or written at (``None``: not in the bucket as far as known)."""
    dirty: bool = False
    """Changed here while the bucket was unreachable: to be written when it is back."""


_NONE = _Entry(BreakerRecord(), None)


class _Conflict(Exception):
    """Another replica wrote the key since the revision the write was based on."""


class _Unavailable(Exception):
    """The bucket did not answer (deleted, server or connection down, timed out)."""


class KeyValueBreakerStore:
    """A ``SharedBreakerStore`` on a NATS KV bucket, shared by every replica (and every handler) of a deployment.

    ``start`` opens the bucket (creating it when missing) and starts the watch; ``update`` and ``get`` start it on
    first use when nobody did. Reads are local; only a change of a record is a round trip.

    Args:
        connection: Gives the NATS connection (called when starting: the broker connects after the app is built).
        bucket: Bucket name.
        replicas: Servers that hold the bucket when this store creates it (``STANCHION_STREAM_REPLICAS``).
        js: Gives the JetStream context (default: the connection's).
        write_timeout_s: A write not confirmed by then means the bucket is unreachable.
    """

    def __init__(
        self,
        connection: Callable[[], Client],
        bucket: str = "stanchion_breakers",
        *,
        replicas: int = 1,
        js: Callable[[], JetStreamContext] | None = None,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.connection = connection
        self.js = js or (lambda: connection().jetstream())
        self.bucket = bucket
        self.replicas = replicas
        self.write_timeout_s = write_timeout_s
        self.conflicts = 0
        """Writes that found the key changed by another replica (and were applied again)."""
        self.outages = 0
        """Times the bucket became unreachable."""
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[RecordListener] = []
        self._unreadable: set[str] = set()
        self._kv: KeyValue | None = None
        self._watch_sub: JetStreamContext.PushSubscription | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._advisory: Subscription | None = None
        self._created: datetime.datetime | None = None
        self._online = False
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()

    @property
    def stream(self) -> str:
        """The JetStream stream that holds the bucket."""
        return f"KV_{self.bucket}"

    @property
    def online(self) -> bool:
        """Whether changes are written to the bucket now (``False``: kept here until it is back)."""
        return self._online

    def listen(self, listener: RecordListener) -> None:
        self._listeners.append(listener)

    def records(self) -> dict[str, BreakerRecord]:
        """This replica's view of every record it knows, by breaker key."""
        return {key: entry.record for key, entry in self._entries.items()}

    # -- the store -------------------------------------------------------------------------------------------

    async def get(self, key: str) -> BreakerRecord:
        if not self._started and not self._closed:  # started on first use; not again once closed
            await self.start()
        return self._entries.get(key, _NONE).record

    async def update(self, key: str, change: Callable[[BreakerRecord], tuple[BreakerRecord, T]]) -> T:
        if not self._started and not self._closed:  # started on first use; not again once closed
            await self.start()
        lock = self._locks.get(key) or self._locks.setdefault(key, asyncio.Lock())
        # One change of a key at a time in this process (uncontended, taking the lock does not yield): conflicts
        # only come from other replicas, and the watch never applies an entry older than a write in flight.
        async with lock:
            entry = self._entries.get(key, _NONE)
            while True:
                record, value = change(entry.record)
                if record is entry.record:
                    return value
                if not self._online:
                    self._entries[key] = _Entry(record, entry.revision, dirty=True)
                    return value
                try:
                    revision = await self._write(key, record, entry.revision)
                except _Conflict:
                    self.conflicts += 1
                    try:
                        fresh, revision_ = await self._read(key)
                    except _Unavailable as exc:
                        self._lost(exc.__cause__ or exc)
                        continue
                    entry = self._adopt(key, fresh, revision_)
                    continue
                except _Unavailable as exc:
                    self._lost(exc.__cause__ or exc)
                    continue
                self._entries[key] = _Entry(record, revision)
                return value

    # -- life cycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the bucket (create it when missing), load every record and watch for changes. When the bucket
        cannot be reached, log it once and keep trying in the background; the breakers work locally meanwhile."""
        async with self._start_lock:
            if self._started:
                return
            self._closed = False
            self._started = True
            try:
                await self._connect()
            except Exception as exc:
                self._lost(exc, starting=True)

    async def aclose(self) -> None:
        """Stop watching and retrying (the records stay; later changes are kept here). ``start`` starts again."""
        self._closed = True
        self._started = False
        self._online = False
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None
        await self._stop_watch()
        if self._advisory is not None:
            with contextlib.suppress(Exception):  # the connection may already be closed
                await self._advisory.unsubscribe()
            self._advisory = None

    async def _connect(self) -> bool:
        """Open or create the bucket, start a watch, catch up; ``True`` when the bucket had to be created."""
        connection = self.connection()
        if not connection.is_connected:
            raise _Unavailable("not connected")
        await self._stop_watch()
        js = self.js()
        created = False
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            created = True
            try:
                await js.create_key_value(bucket=self.bucket, history=1, replicas=self.replicas, direct=False)
            except BadRequestError as exc:  # created meanwhile by another replica, differently: use that one
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
            info = await js.stream_info(self.stream)
        if self._created is not None and info.created != self._created:
            # Another bucket of the same name: the revisions known here mean nothing in it.
            self._entries = {key: _Entry(e.record, None, e.dirty) for key, e in self._entries.items()}
        self._created = info.created
        # Reads go to the stream's leader (no direct get): a read after a conflict must see the write that caused it.
        kv = KeyValue(name=self.bucket, stream=self.stream, pre=f"$KV.{self.bucket}.", js=js, direct=False)
        if self._advisory is None:
            self._advisory = await connection.subscribe(
                f"$JS.EVENT.ADVISORY.STREAM.DELETED.{self.stream}", cb=self._deleted
            )
        initial: dict[str, tuple[BreakerRecord, int]] = {}
        loaded, subscribed = asyncio.Event(), asyncio.Event()

        async def on_entry(msg: Msg) -> None:
            await subscribed.wait()  # entries may come before ``subscribe`` returns
            if self._watch_sub is not sub:
                return  # a watch stopped since
            meta = msg.metadata
            key = decode_key(msg.subject.removeprefix(f"$KV.{self.bucket}."))
            record, revision = self._record_of(key, msg.data, (msg.headers or {}).get(KV_OP)), meta.sequence.stream
            if not loaded.is_set():
                initial[key] = (record, revision)
                if not meta.num_pending:
                    loaded.set()
                return
            await self._watched(key, record, revision)

        # A watch of our own rather than KeyValue.watch: the same ordered consumer (last value of every key, then
        # every change), with a short idle heartbeat, so that after a server restart or a reconnection nats-py
        # re-creates the consumer within two seconds instead of ten.
        sub = await js.subscribe(
            f"$KV.{self.bucket}.>",
            stream=self.stream,
            cb=on_entry,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=WATCH_HEARTBEAT_S,
            inactive_threshold=300.0,
        )
        self._watch_sub = sub
        subscribed.set()
        consumer = await sub.consumer_info()
        if not consumer.num_pending and not sub.delivered:
            loaded.set()
        async with asyncio.timeout(self.write_timeout_s * 5):
            await loaded.wait()
        self._kv = kv
        self._online = True
        await self._catch_up(initial)
        return created

    async def _catch_up(self, initial: dict[str, tuple[BreakerRecord, int]]) -> None:
        """Take the bucket's records; write the ones changed here while it was away where nobody else changed them
        since, and the ones it lost (a recreated bucket) unless another replica wrote them first."""
        for key in {*initial, *self._entries}:
            async with self._locks.setdefault(key, asyncio.Lock()):
                entry = self._entries.get(key)
                remote, remote_revision = initial.get(key, (None, None))
                if entry is not None and (
                    (entry.dirty and entry.revision == remote_revision)
                    or (remote is None and entry.record != BreakerRecord())
                ):
                    try:
                        revision = await self._write(key, entry.record, remote_revision)
                        self._entries[key] = _Entry(entry.record, revision)
                        continue
                    except _Conflict:
                        self.conflicts += 1
                        self._adopt(key, *await self._read(key))
                        continue
                if remote is None:
                    continue
                if entry is not None and not entry.dirty and (entry.revision or 0) >= (remote_revision or 0):
                    continue  # known here already, or the watch has since brought a later change
                self._adopt(key, remote, remote_revision)

    async def _watched(self, key: str, record: BreakerRecord, revision: int) -> None:
        """A change the watch delivered: taken unless it is a write of this replica, already applied."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            entry = self._entries.get(key)
            if entry is not None and entry.revision is not None and revision <= entry.revision:
                return
            if self._online:
                self._adopt(key, record, revision)

    async def _stop_watch(self) -> None:
        sub, self._watch_sub = self._watch_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be down or closed
                await sub.unsubscribe()

    def _lost(self, reason: BaseException | str, *, starting: bool = False) -> None:
        """The bucket stopped answering: go on locally, say so once, get it back in the background."""
        was_online, self._online = self._online, False
        if self._closed or self._recovery is not None or not (was_online or starting):
            return  # closed, already getting it back, or not started
        self.outages += 1
        log.warning(
            "breaker bucket unavailable: breakers go on with their last known state and local counts",
            bucket=self.bucket,
            error=_describe(reason),
        )
        self._recovery = asyncio.create_task(self._recover(), name=f"recover {self.bucket}")

    async def _deleted(self, msg: Msg) -> None:
        self._lost("the bucket was deleted")

    async def _recover(self) -> None:
        await self._stop_watch()
        attempt = 0
        while not self._closed:
            await asyncio.sleep(RECOVERY_DELAYS_S[min(attempt, len(RECOVERY_DELAYS_S) - 1)])
            attempt += 1
            try:
                created = await self._connect()
            except Exception as exc:
                log.debug("breaker bucket still unavailable", bucket=self.bucket, error=str(exc))
                self._online = False
                continue
            if not self._online:  # lost again while catching up
                continue
            if created:
                log.warning("recreated the missing breaker bucket", bucket=self.bucket, replicas=self.replicas)
            else:
                log.info("breaker bucket reachable again", bucket=self.bucket)
            self._recovery = None
            return

    # -- the bucket ------------------------------------------------------------------------------------------

    def _connected(self) -> bool:
        try:
            return self.connection().is_connected
        except Exception:  # no connection (yet, or any more)
            return False

    async def _write(self, key: str, record: BreakerRecord, revision: int | None) -> int:
        kv = self._kv
        if kv is None or not self._connected():
            raise _Unavailable("not connected")
        data, encoded = encode_record(record), encode_key(key)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                if revision is None:
                    return await kv.create(encoded, data)
                return await kv.update(encoded, data, last=revision)
        except KeyWrongLastSequenceError as exc:
            raise _Conflict() from exc
        except (NatsError, TimeoutError, OSError) as exc:
            raise _Unavailable() from exc

    async def _read(self, key: str) -> tuple[BreakerRecord, int | None]:
        kv = self._kv
        if kv is None:
            raise _Unavailable("not connected")
        try:
            async with asyncio.timeout(self.write_timeout_s):
                item = await kv.get(encode_key(key))
        except KeyNotFoundError:  # also deleted or purged: ``create`` writes over the marker
            return BreakerRecord(), None
        except (NatsError, TimeoutError, OSError) as exc:
            raise _Unavailable() from exc
        return self._record_of(key, item.value, item.operation), item.revision

    def _record_of(self, key: str, data: bytes | None, operation: str | None) -> BreakerRecord:
        if operation in (KV_DEL, KV_PURGE):
            return BreakerRecord()
        try:
            return decode_record(data or b"")
        except RecordError as exc:
            # Fail open (closed) for that key: its next change writes a record this version reads.
            if key not in self._unreadable:
                self._unreadable.add(key)
                log.warning("unreadable breaker record taken as closed", bucket=self.bucket, key=key, error=str(exc))
            return BreakerRecord()

    def _adopt(self, key: str, record: BreakerRecord, revision: int | None) -> _Entry:
        """Take a record written elsewhere; tell the listeners."""
        old = self._entries.get(key, _NONE).record
        entry = self._entries[key] = _Entry(record, revision)
        if old != record:
            for listener in self._listeners:
                listener(key, old, record)
        return entry


def _describe(reason: BaseException | str) -> str:
    if isinstance(reason, str | _Unavailable):
        return str(reason) or "no answer"
    return f"{type(reason).__name__}: {reason}".rstrip(": ")


async def _next(watcher: KeyValue.KeyWatcher, wait_s: float) -> KeyValue.Entry | None:
    """The watcher's next entry (``None``: the initial values are all in); nats-py leaves it untyped."""
    item: KeyValue.Entry | None = await watcher.updates(timeout=wait_s)  # type: ignore[no-untyped-call]
    return item


async def _stop(watcher: KeyValue.KeyWatcher) -> None:
    await watcher.stop()  # type: ignore[no-untyped-call]


async def read_breakers(js: JetStreamContext, bucket: str = "stanchion_breakers") -> dict[str, BreakerRecord]:
    """Every breaker record in ``bucket``, by breaker key (empty when there is no bucket): one view of the state
    the replicas share, for a report."""
    try:
        kv = await js.key_value(bucket)
    except NotFoundError:
        return {}
    watcher = await kv.watchall()
    records: dict[str, BreakerRecord] = {}
    try:
        while (item := await _next(watcher, 5.0)) is not None:
            if item.operation not in (KV_DEL, KV_PURGE):
                with contextlib.suppress(RecordError):
                    records[decode_key(item.key)] = decode_record(item.value or b"")
    finally:
        await _stop(watcher)
    return records
