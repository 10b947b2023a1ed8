"""The result store on a NATS KV bucket, shared by every replica and every handler of a deployment."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from nats.js.errors import BadRequestError, KeyNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from stanchion.handlers.runtime.results import StoredResult

log = structlog.get_logger("stanchion.results")

T = TypeVar("T")

_DIGEST_LENGTH = 64

RIDE_OUT_S = 15.0
"""How long a lookup or a put keeps being tried while nobody answers it (a leader election, a reconnection)."""

LOOK_S = 2.0
"""How long the check for a deleted bucket waits for an answer."""

STREAM_NAME_IN_USE = 10058
"""JetStream's "stream name already in use with a different configuration"."""


def encode_value(result: StoredResult) -> bytes:
    """``S`` (stored) or ``P`` (published), the event's digest (64 hex digits, when known), then the envelope."""
    digest = result.digest.encode("ascii") if len(result.digest) == _DIGEST_LENGTH else b""
    return (b"P" if result.published else b"S") + digest + result.envelope


def decode_value(value: bytes) -> StoredResult:
    """The inverse of ``encode_value``; a value written before digests were kept (``S{...``) has none."""
    published = value[:1] == b"P"
    rest = value[1:]
    if rest[:1] == b"{":
        return StoredResult(envelope=rest, published=published)
    return StoredResult(
        envelope=rest[_DIGEST_LENGTH:], published=published, digest=rest[:_DIGEST_LENGTH].decode("ascii")
    )


async def create_bucket(js: JetStreamContext, bucket: str, ttl_s: float, replicas: int) -> StreamInfo:
    """Create the result bucket on ``replicas`` servers (one value per key, kept ``ttl_s``); direct gets only on
    one server (see ``KeyValueResultStore``). Created meanwhile by another replica: the one in place."""
    try:
        await js.create_key_value(bucket=bucket, ttl=ttl_s, history=1, replicas=replicas, direct=replicas == 1)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
    return await js.stream_info(f"KV_{bucket}")


def result_key(key: str) -> str:
    """KV keys allow only ``[-/_=.a-zA-Z0-9]``; handler names and event ids may hold anything: key by the hash."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyValueResultStore:
    """A NATS KV bucket with a TTL, shared by every replica. Created on first use.

    On a replicated bucket (more than one server holds it) every lookup asks the stream's leader
    (``$JS.API.STREAM.MSG.GET``), never a direct get: direct gets are answered by any server holding the stream, a
    follower that has not yet applied the last confirmed put among them, and a result missed that way is an event
    sent to a model again. A bucket on one server keeps direct gets (the same answer, without the JSON API).

    Args:
        connection: Gives the NATS connection; called on first use, since the broker connects after the app is
            built.
        bucket: Bucket name.
        ttl_s: How long results are kept.
        js: Gives the JetStream context for the bucket (default: the connection's, with no options).
        replicas: Servers that hold the bucket when the store creates it (``STANCHION_STREAM_REPLICAS``). A bucket
            found in place keeps its own, and is created again with it when it is deleted.
    """

    def __init__(
        self,
        connection: Callable[[], Client],
        bucket: str,
        ttl_s: float,
        js: Callable[[], JetStreamContext] | None = None,
        replicas: int = 1,
    ) -> None:
        self.connection = connection
        self.js = js or (lambda: connection().jetstream())
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    @property
    def stream(self) -> str:
        """The JetStream stream that holds the bucket."""
        return f"KV_{self.bucket}"

    async def _recreated(self) -> bool:
        """After a request nobody answered: if the bucket is gone (deleted by an operator or a fault), create it
        again and say so; ``False`` when it is there or cannot be told now (the failure was something else)."""
        try:
            async with asyncio.timeout(LOOK_S):
                await self.js().stream_info(self.stream)
            return False
        except NotFoundError:
            self._kv = None
            await self._bucket()
            log.warning("recreated the missing result bucket", bucket=self.bucket, replicas=self.replicas)
            return True
        except (TimeoutError, NatsError):  # no leader to ask either: an election, a reconnection
            return False

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            async with self._lock:
                if self._kv is None:
                    self._kv = await self._open(self.js())
        return self._kv

    async def _open(self, js: JetStreamContext) -> KeyValue:
        try:
            config = (await js.stream_info(self.stream)).config
        except NotFoundError:
            config = (await create_bucket(js, self.bucket, self.ttl_s, self.replicas)).config
        self.replicas = config.num_replicas or 1
        return KeyValue(
            name=self.bucket,
            stream=self.stream,
            pre=f"$KV.{self.bucket}.",
            js=js,
            direct=bool(config.allow_direct) and self.replicas == 1,
        )

    async def _on_bucket(self, request: Callable[[KeyValue], Awaitable[T]]) -> T:
        """``request`` on the bucket, once more on a recreated bucket when nobody answered because it was gone, and
        again for up to ``RIDE_OUT_S`` while nobody answers for another reason: a replicated bucket elects a new
        leader after losing a node (seconds), a client reconnects. The caller's message is kept alive meanwhile;
        failing instead would throw a model call away (its answer not stored) and spend a delivery."""
        deadline = asyncio.get_running_loop().time() + RIDE_OUT_S
        delay = 0.05
        while True:
            try:
                return await request(await self._bucket())
            except (NoRespondersError, NoStreamResponseError, TimeoutError):
                if await self._recreated():
                    return await request(await self._bucket())
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def get(self, key: str) -> StoredResult | None:
        async def lookup(kv: KeyValue) -> StoredResult | None:
            try:
                entry = await kv.get(result_key(key))
            except KeyNotFoundError:
                return None
            return decode_value(entry.value or b"")

        return await self._on_bucket(lookup)

    async def put(self, key: str, result: StoredResult) -> None:
        hashed = result_key(key)
        if not result.published:
            await self._on_bucket(lambda kv: kv.put(hashed, encode_value(result)))
            return
        # The published mark without a confirmation round trip (a third of the store's cost per event): a plain
        # publish to the bucket's subject, sent on the connection that published the result, after it.
        await self.connection().publish(f"$KV.{self.bucket}.{hashed}", encode_value(result))
