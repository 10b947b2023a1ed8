"""Faults of the infrastructure itself: the output stream, the dead-letter stream and the result bucket deleted
while events flow. Every event published after the deletion still ends as one result or one dead letter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import assert_each_accounted_once, policy_for, read_stream, running_service
from tests.fake_openai import FakeOpenAI


def task(event_id: str) -> dict[str, str]:
    return {"id": event_id, "text": f"checkout crashes ({event_id})"}


async def test_a_deleted_output_stream_is_recreated_and_every_later_event_is_answered_into_it(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """The output stream deleted while events flow: it is recreated with its settings, and every event published
    after the deletion has its result in it (what was in the deleted stream is gone with it)."""
    provider = fake_openai(latency_s=0.02)
    async with running_service(nats_server.url, policy_for(("primary", provider)), max_in_flight=4) as svc:
        for i in range(10):
            await svc.publish(task(f"before-{i}"))
        await svc.collector.wait_for(results=10)
        await svc.client.jetstream().delete_stream(svc.settings.output_stream)
        after = [f"after-{i}" for i in range(20)]
        for event_id in after:
            await svc.publish(task(event_id))
        async with asyncio.timeout(60):
            while True:
                try:
                    stored = await read_stream(svc.client, svc.settings.output_stream)
                except Exception:
                    stored = []
                if {r["event_id"] for r in stored} >= set(after):
                    break
                await asyncio.sleep(0.2)
        dead = await read_stream(svc.client, svc.settings.dlq_stream)
        config = (await svc.client.jetstream().stream_info(svc.settings.output_stream)).config
    assert_each_accounted_once(after, [r for r in stored if r["event_id"] in after], dead)
    assert dead == []
    assert config.duplicate_window == svc.settings.dedup_window_s and config.max_age == svc.settings.output_max_age_s


async def test_a_deleted_dead_letter_stream_is_recreated_and_the_next_poison_payload_lands_in_it(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """The dead-letter stream deleted: the next poison payload is still dead-lettered, into the recreated stream."""
    provider = fake_openai()
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        await svc.publish(b"{first poison")
        await svc.collector.wait_for(dead=1)
        await svc.client.jetstream().delete_stream(svc.settings.dlq_stream)
        await svc.publish(b"{second poison")
        await svc.publish(task("valid"))
        async with asyncio.timeout(60):
            while True:
                try:
                    dead = await read_stream(svc.client, svc.settings.dlq_stream)
                except Exception:
                    dead = []
                if dead:
                    break
                await asyncio.sleep(0.2)
        await svc.collector.wait_for(results=1)
    [letter] = dead
    assert letter["error_type"] == "poison.json" and letter["payload"] == "{second poison"
    assert [r["event_id"] for r in svc.collector.results] == ["valid"]


async def test_a_deleted_result_bucket_is_recreated_and_no_answerable_event_is_dead_lettered(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """The KV result bucket deleted while events flow: it is recreated, and every event is answered (none becomes
    an ``internal`` dead letter)."""
    provider = fake_openai(latency_s=0.02)
    async with running_service(nats_server.url, policy_for(("primary", provider)), max_in_flight=4) as svc:
        for i in range(5):
            await svc.publish(task(f"kv-before-{i}"))
        await svc.collector.wait_for(results=5)
        await svc.client.jetstream().delete_key_value(svc.settings.result_bucket)
        after = [f"kv-after-{i}" for i in range(15)]
        for event_id in after:
            await svc.publish(task(event_id))
        await svc.collector.wait_for(results=5 + len(after), timeout=60)
        kv = await svc.client.jetstream().key_value(svc.settings.result_bucket)
        keys = await kv.keys()
    results = [r for r in svc.collector.results if r["event_id"] in after]
    assert_each_accounted_once(after, results, svc.collector.dead)
    assert svc.collector.dead == []
    assert len(keys) >= len(after)
    assert json.dumps(results)  # every result a valid envelope
