"""SIGTERM with work in flight and prefetched: everything the process holds is handed back before it exits."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

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
from tests.integration.test_chaos import publish_all


@pytest.mark.parametrize("ack_wait", [None, "60"], ids=["default-settings", "ack-wait-60s"])
async def test_sigterm_hands_back_in_flight_and_prefetched_events_and_a_restart_answers_them_at_once(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path, ack_wait: str | None
) -> None:
    """A provider answering in 2 s, 50 events, SIGTERM 3 s later (16 in flight, 8 waiting or still in a fetch):
    the restarted service (fast provider) answers all 50 within 15 s, 0 lost, 0 duplicates, no traceback. With an
    ack wait of 60 s, nothing can come back by its expiry: everything was handed back."""
    provider = fake_openai(latency_s=2.0)
    settings = unique_settings(nats_server.url)
    extra = {"STANCHION_ACK_WAIT_S": ack_wait} if ack_wait else {}
    env = service_env(settings, OPENAI_API_KEY="sk-test-shutdown", OPENAI_BASE_URL=provider.base_url, **extra)
    ids = [f"down-{i}" for i in range(50)]
    client = await nats.connect(nats_server.url)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    first = start_service(env, tmp_path)
    second = None
    try:
        await wait_for_consumer(client, settings, first)
        await publish_all(client, settings.input_subject, ids)
        await asyncio.sleep(3.0)
        os.kill(first.pid, signal.SIGTERM)
        code = await asyncio.to_thread(first.wait, 60)
        provider.latency_s = 0.0
        restarted = time.monotonic()
        second = start_service(env, tmp_path)
        async with asyncio.timeout(15):
            while len({r["event_id"] for r in collector.results}) < len(ids):
                await asyncio.sleep(0.1)
        answered_after = time.monotonic() - restarted
        results = await read_stream(client, settings.output_stream)
        dead = await read_stream(client, settings.dlq_stream)
    finally:
        await client.close()
        stop_service(first)
        stop_service(second)
    log = (tmp_path / "service.log").read_text()
    assert code == 0
    assert answered_after < 15
    assert_each_accounted_once(ids, results, dead)
    assert dead == []
    assert "Traceback" not in log and "[error" not in log
