"""The NATS KV result store on a real nats-server."""

from __future__ import annotations

import asyncio
import itertools

import nats

from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.nats.results import KeyValueResultStore, result_key
from stanchion.handlers.runtime.results import StoredResult

_buckets = itertools.count()


async def test_a_stored_result_is_there_as_soon_as_put_returns(nats_server: EmbeddedNats) -> None:
    """A result not yet published is confirmed by the bucket before ``put`` returns, whatever the event id holds."""
    client = await nats.connect(nats_server.url)
    try:
        store = KeyValueResultStore(lambda: client, f"r{next(_buckets)}_results", ttl_s=60)
        event_id = "tenant 7/ticket #42 ✓"
        assert await store.get(event_id) is None
        await store.put(event_id, StoredResult(b'{"event_id": "x"}', published=False))
        assert await store.get(event_id) == StoredResult(b'{"event_id": "x"}', published=False)
    finally:
        await client.close()


async def test_the_published_mark_replaces_the_stored_result(nats_server: EmbeddedNats) -> None:
    """The published mark, sent without waiting for a confirmation, is what a later lookup (a redelivery) finds."""
    client = await nats.connect(nats_server.url)
    try:
        store = KeyValueResultStore(lambda: client, f"r{next(_buckets)}_results", ttl_s=60)
        await store.put("e-1", StoredResult(b'{"event_id": "e-1"}', published=False))
        await store.put("e-1", StoredResult(b'{"event_id": "e-1"}', published=True, digest="ab" * 32))
        await client.flush()
        for _ in range(50):  # the bucket stores it on its own time: poll briefly
            if (found := await store.get("e-1")) is not None and found.published:
                break
            await asyncio.sleep(0.02)
        assert found == StoredResult(b'{"event_id": "e-1"}', published=True, digest="ab" * 32)
        assert await store.get("e-2") is None
    finally:
        await client.close()


async def test_a_result_stored_before_digests_were_kept_still_reads(nats_server: EmbeddedNats) -> None:
    """A value of the previous release (``S{...}``, no digest) reads as a stored result without a digest."""
    client = await nats.connect(nats_server.url)
    try:
        bucket = f"r{next(_buckets)}_results"
        store = KeyValueResultStore(lambda: client, bucket, ttl_s=60)
        await store.put("warm-up", StoredResult(b"{}", published=False))
        kv = await client.jetstream().key_value(bucket)
        await kv.put(result_key("old"), b'S{"event_id": "old"}')
        assert await store.get("old") == StoredResult(b'{"event_id": "old"}', published=False, digest="")
    finally:
        await client.close()
