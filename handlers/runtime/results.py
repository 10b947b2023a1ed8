"""Where answered events' results are kept, so a redelivered event is never sent to a model again."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue


@dataclass(frozen=True)
class StoredResult:
    """A result envelope, and whether its publication was confirmed."""

    envelope: bytes
    published: bool


class ResultStore(Protocol):
    """Result envelopes by event id. Stored before publishing, marked published after the stream confirmed it:
    a redelivery then knows whether to republish (crash in between) or only to ack.

    ``put`` of a result not yet published must be durable when it returns; the published mark may be sent
    without waiting: if it is lost, a redelivery republishes and the output stream's dedup drops the copy.
    """

    async def get(self, event_id: str) -> StoredResult | None: ...

    async def put(self, event_id: str, result: StoredResult) -> None: ...


class InMemoryResultStore:
    """For one process, in tests and benchmarks."""

    def __init__(self) -> None:
        self.items: dict[str, StoredResult] = {}

    async def get(self, event_id: str) -> StoredResult | None:
        return self.items.get(event_id)

    async def put(self, event_id: str, result: StoredResult) -> None:
        self.items[event_id] = result


def result_key(event_id: str) -> str:
    """KV keys allow only ``[-/_=.a-zA-Z0-9]``; event ids may hold anything, so key by their hash."""
    return hashlib.sha256(event_id.encode()).hexdigest()


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

    async def get(self, event_id: str) -> StoredResult | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(result_key(event_id))
        except KeyNotFoundError:
            return None
        value = entry.value or b""
        return StoredResult(envelope=value[1:], published=value[:1] == b"P")

    async def put(self, event_id: str, result: StoredResult) -> None:
        kv = await self._bucket()
        key = result_key(event_id)
        if not result.published:
            await kv.put(key, b"S" + result.envelope)
            return
        # The published mark without a confirmation round trip (a third of the store's cost per event): a plain
        # publish to the bucket's subject, sent on the connection that published the result, after it.
        await self.connection().publish(f"$KV.{self.bucket}.{key}", b"P" + result.envelope)
