"""The result store on a NATS KV bucket, shared by every replica and every handler of a deployment."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoStreamResponseError
from nats.js.kv import KeyValue

from stanchion.handlers.runtime.results import StoredResult

log = structlog.get_logger("stanchion.results")

T = TypeVar("T")

_DIGEST_LENGTH = 64


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


def result_key(key: str) -> str:
    """KV keys allow only ``[-/_=.a-zA-Z0-9]``; handler names and event ids may hold anything: key by the hash."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyValueResultStore:
    """A NATS KV bucket with a TTL, shared by every replica. Created on first use.

    Args:
        connection: Gives the NATS connection; called on first use, since the broker connects after the app is
            built.
        bucket: Bucket name.
        ttl_s: How long results are kept.
        js: Gives the JetStream context for the bucket (default: the connection's, with no options).
    """

    def __init__(
        self,
        connection: Callable[[], Client],
        bucket: str,
        ttl_s: float,
        js: Callable[[], JetStreamContext] | None = None,
    ) -> None:
        self.connection = connection
        self.js = js or (lambda: connection().jetstream())
        self.bucket = bucket
        self.ttl_s = ttl_s
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def _recreated(self) -> bool:
        """After a request nobody answered: if the bucket is gone (deleted by an operator or a fault), create it
        again and say so; ``False`` when it is there (the failure was something else)."""
        try:
            await self.js().key_value(self.bucket)
            return False
        except BucketNotFoundError:
            self._kv = None
            await self._bucket()
            log.warning("recreated the missing result bucket", bucket=self.bucket)
            return True

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            async with self._lock:
                if self._kv is None:
                    js = self.js()
                    try:
                        self._kv = await js.key_value(self.bucket)
                    except BucketNotFoundError:
                        # Direct gets: a lookup is answered by any server holding the stream, without the JSON API.
                        self._kv = await js.create_key_value(bucket=self.bucket, ttl=self.ttl_s, history=1, direct=True)
        return self._kv

    async def _on_bucket(self, request: Callable[[KeyValue], Awaitable[T]]) -> T:
        """``request`` on the bucket; once more on a recreated bucket when nobody answered because it was gone."""
        try:
            return await request(await self._bucket())
        except (NoRespondersError, NoStreamResponseError):
            if not await self._recreated():
                raise
            return await request(await self._bucket())

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
