"""Recovery in seconds: the only replica SIGKILLed mid-stream and started again at once, with default settings.

The dead process leaves its messages unacked, holding the durable's ``max_ack_pending`` until their ack wait
passes; the restarted process must answer within seconds all the same. The two timings are the contract (README,
"Recovery after a crash"): the first answer within 10 s of the restart, a new event answered within 15 s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.client import Client

from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import (
    Collector,
    assert_each_accounted_once,
    read_stream,
    service_env,
    start_service,
    stop_service,
    unique_settings,
    wait_for_consumer,
)
from tests.fake_openai import FakeOpenAI

FIRST_ANSWER_S = 10.0
NEW_EVENT_S = 15.0


def event(event_id: str) -> bytes:
    return json.dumps({"id": event_id, "text": f"checkout crashes ({event_id})"}).encode()


async def stored(client: Client, stream: str) -> int:
    return (await client.jetstream().stream_info(stream)).state.messages


async def test_a_restarted_replica_answers_within_seconds_though_the_dead_one_left_its_messages_unacked(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """300 events on a 50 ms provider, the only replica SIGKILLed after about a third and started again at once
    (default settings): its first answer within 10 s of its start, a new event published then answered within
    15 s; every event answered once, and none answered before the kill sent to a model again."""
    provider = fake_openai(latency_s=0.05)
    settings = unique_settings(nats_server.url)
    env = service_env(settings, OPENAI_API_KEY="sk-test-recovery", OPENAI_BASE_URL=provider.base_url)
    ids = [f"recovery-{i}" for i in range(300)]
    client = await nats.connect(nats_server.url)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    first = start_service(env, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for_consumer(client, settings, first)
        js = client.jetstream()
        for event_id in ids:
            await js.publish(settings.input_subject, event(event_id))
        await collector.wait_for(results=100, timeout=60)
        stop_service(first, signal.SIGKILL)
        answered_before = {r["event_id"] for r in await read_stream(client, settings.output_stream)}
        held = (await js.consumer_info(settings.input_stream, settings.durable)).num_ack_pending
        count_at_kill = await stored(client, settings.output_stream)  # the dead process publishes nothing more

        started = time.monotonic()
        second = start_service(env, tmp_path)
        async with asyncio.timeout(60):
            while await stored(client, settings.output_stream) == count_at_kill:
                assert second.poll() is None, "the restarted service exited"
                await asyncio.sleep(0.05)
        first_answer_s = time.monotonic() - started

        published = time.monotonic()
        await js.publish(settings.input_subject, event("recovery-new"))
        async with asyncio.timeout(60):
            while not any(r["event_id"] == "recovery-new" for r in collector.results):
                await asyncio.sleep(0.05)
        new_event_s = time.monotonic() - published

        async with asyncio.timeout(120):  # the dead replica's messages too, once their ack wait passed
            while len({r["event_id"] for r in await read_stream(client, settings.output_stream)}) < len(ids) + 1:
                await asyncio.sleep(0.5)
        results = await read_stream(client, settings.output_stream)
        dead = await read_stream(client, settings.dlq_stream)
    finally:
        await client.close()
        stop_service(first)
        stop_service(second)
    assert held > 0  # the dead replica did leave messages unacked
    assert first_answer_s < FIRST_ANSWER_S, f"first answer {first_answer_s:.1f} s after the restart"
    assert new_event_s < NEW_EVENT_S, f"a new event answered {new_event_s:.1f} s after it was published"
    assert_each_accounted_once([*ids, "recovery-new"], results, dead)
    assert dead == []
    assert 100 <= len(answered_before) < len(ids)
    asked_again = [i for i in answered_before if provider.requests_mentioning(f"({i})", after=started)]
    assert asked_again == []
