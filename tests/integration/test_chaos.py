"""Chaos: provider faults, a killed nats-server, a killed service, a provider outage. Nothing lost, nothing twice.

Each test accounts for every input event exactly once — one result envelope or one dead letter — as a
consumer of the output streams would see them, and checks that no event id has two results.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from stanchion.handlers.nats.embedded import EmbeddedNats, free_port
from stanchion.middleware import BreakerState
from tests.conftest import (
    STANCHION,
    Collector,
    assert_each_accounted_once,
    clean_env,
    policy_for,
    read_stream,
    running_service,
    service_env,
    start_service,
    stop_service,
    unique_settings,
    wait_for_consumer,
)
from tests.fake_openai import FakeOpenAI


async def publish_all(client: Client, subject: str, ids: list[str]) -> None:
    js = client.jetstream()
    for event_id in ids:
        await js.publish(subject, json.dumps({"id": event_id, "text": f"checkout crashes ({event_id})"}).encode())


async def test_2000_events_with_30_percent_provider_faults_lose_nothing(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """2,000 events, 30 % injected faults of every kind on both candidates, no heuristic to fall back on (so
    naks, redeliveries, the result store and dedup all take part): 0 lost, 0 duplicate results."""
    primary = fake_openai(fault_rate=0.3, seed=7, retry_after=0.2, slow_s=3.0)
    backup = fake_openai(fault_rate=0.3, seed=11, retry_after=0.2, slow_s=3.0)
    policy = policy_for(
        ("primary", primary),
        ("backup", backup),
        heuristic=False,
        retry={"attempts": 2, "initial_s": 0.02, "max_s": 0.2, "jitter_s": 0.02, "max_retry_after_s": 0.5},
        timeout={"attempt_s": 0.5},
        breaker={"consecutive_failures": 8, "failure_rate": 0.9, "open_s": 0.5},
    )
    ids = [f"chaos-{i}" for i in range(2000)]
    async with running_service(
        nats_server.url, policy, max_in_flight=64, max_deliver=20, nak_backoff_s=(0.05, 0.1, 0.2)
    ) as svc:
        await publish_all(svc.client, svc.settings.input_subject, ids)
        async with asyncio.timeout(240):
            while len(svc.collector.results) + len(svc.collector.dead) < 2000:
                await asyncio.sleep(0.2)
        results = await read_stream(svc.client, svc.settings.output_stream)
        dead = await read_stream(svc.client, svc.settings.dlq_stream)
        info = await svc.client.jetstream().consumer_info(svc.settings.input_stream, svc.settings.durable)
    assert_each_accounted_once(ids, results, dead)
    assert info.delivered.consumer_seq > len(ids)  # some events needed another delivery (every one counts here)
    assert_each_accounted_once(ids, svc.collector.results, svc.collector.dead)
    faults = {r.fault for r in primary.requests + backup.requests}
    assert {"429", "500", "503", "slow", "reset", "malformed", "invalid"} <= faults
    served = {r["model"] for r in results}
    assert {"primary", "backup"} <= served


async def test_nats_server_killed_mid_stream_and_restarted(
    fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """nats-server SIGKILLed mid-stream and restarted on its store: 0 lost, 0 duplicates, resumes within 5 s."""
    port = free_port()
    server = EmbeddedNats(store_dir=tmp_path / "store", port=port)
    server.start()
    provider = fake_openai(latency_s=0.02)
    ids = [f"restart-{i}" for i in range(300)]
    try:
        async with running_service(
            server.url, policy_for(("primary", provider)), max_in_flight=8, ack_wait_s=3.0, max_pause_s=2.0
        ) as svc:
            await publish_all(svc.client, svc.settings.input_subject, ids)
            await svc.collector.wait_for(results=60, timeout=60)
            server.kill()
            await asyncio.sleep(1.0)
            server.start()
            restarted = time.monotonic()
            seen = len(svc.collector.results)
            async with asyncio.timeout(30):
                while len(svc.collector.results) <= seen:
                    await asyncio.sleep(0.05)
            resumed_after = time.monotonic() - restarted
            async with asyncio.timeout(120):
                while len({r["event_id"] for r in await read_stream(svc.client, svc.settings.output_stream)}) < 300:
                    await asyncio.sleep(0.5)
            results = await read_stream(svc.client, svc.settings.output_stream)
            dead = await read_stream(svc.client, svc.settings.dlq_stream)
    finally:
        server.stop()
    assert resumed_after < 5.0
    assert_each_accounted_once(ids, results, dead)
    assert dead == []


async def test_service_killed_mid_stream_and_restarted(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """The service SIGKILLed mid-stream and started again: 0 lost, 0 duplicates, and events answered before
    the kill are never sent to a model again."""
    provider = fake_openai(latency_s=0.03)
    settings = unique_settings(nats_server.url)
    env = service_env(
        settings,
        OPENAI_API_KEY="sk-test-kill",
        OPENAI_BASE_URL=provider.base_url,
        STANCHION_ACK_WAIT_S="2",
        STANCHION_MAX_PAUSE_S="1",
        STANCHION_MAX_IN_FLIGHT="8",
    )
    ids = [f"kill-{i}" for i in range(200)]
    client = await nats.connect(nats_server.url)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    first = start_service(env, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for_consumer(client, settings, first)
        await publish_all(client, settings.input_subject, ids)
        await collector.wait_for(results=50, timeout=60)
        stop_service(first, signal.SIGKILL)
        answered_before = {r["event_id"] for r in await read_stream(client, settings.output_stream)}
        restarted = time.monotonic()
        second = start_service(env, tmp_path)
        async with asyncio.timeout(120):
            while len({r["event_id"] for r in await read_stream(client, settings.output_stream)}) < len(ids):
                await asyncio.sleep(0.5)
        results = await read_stream(client, settings.output_stream)
        dead = await read_stream(client, settings.dlq_stream)
    finally:
        await client.close()
        stop_service(first)
        stop_service(second)
    assert_each_accounted_once(ids, results, dead)
    assert 50 <= len(answered_before) < len(ids)
    asked_again = [i for i in answered_before if provider.requests_mentioning(f"({i})", after=restarted)]
    assert asked_again == []


async def test_provider_outage_without_heuristic_pauses_instead_of_burning_deliveries(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """No heuristic, provider down: once the circuit is open, deliveries stop climbing (only the failures that
    tripped it were redelivered); when the provider is back every event is answered, none dead-lettered."""
    provider = fake_openai(always="503")
    threshold = 2
    policy = policy_for(
        ("primary", provider),
        heuristic=False,
        retry={"attempts": 1},
        breaker={"consecutive_failures": threshold, "open_s": 0.5},
    )
    ids = [f"outage-{i}" for i in range(10)]
    async with running_service(
        nats_server.url, policy, max_in_flight=4, ack_wait_s=10.0, max_pause_s=8.0, max_deliver=3
    ) as svc:
        js = svc.client.jetstream()
        await publish_all(svc.client, svc.settings.input_subject, ids)
        assert svc.service.breaker is not None
        async with asyncio.timeout(30):  # wait for the circuit to open
            while await svc.service.breaker.state("primary") is BreakerState.CLOSED:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # nak delays (2 s) of the failures that tripped it have run out
        early = await js.consumer_info(svc.settings.input_stream, svc.settings.durable)
        await asyncio.sleep(2.5)  # five more open periods: a nak-and-redeliver loop would dead-letter everything
        late = await js.consumer_info(svc.settings.input_stream, svc.settings.durable)
        calls_during_outage = provider.count
        provider.set(always="ok")
        await svc.collector.wait_for(results=10, timeout=30)
        results = await read_stream(svc.client, svc.settings.output_stream)
        dead = await read_stream(svc.client, svc.settings.dlq_stream)
    assert early.num_redelivered <= threshold
    # Every delivery (first ones and redeliveries) moves the consumer's delivered sequence: it must stand still.
    assert late.delivered.consumer_seq == early.delivered.consumer_seq
    assert late.num_redelivered == early.num_redelivered
    assert calls_during_outage <= threshold + 10 + 2  # the trip, then about one probe per open period
    assert svc.collector.dead == []
    assert dead == []
    assert_each_accounted_once(ids, results, dead)
    assert {r["model"] for r in results} == {"primary"}


@pytest.mark.parametrize("replay_how", ["--id", "--all"])
async def test_dlq_list_and_replay_on_a_real_server(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path, replay_how: str
) -> None:
    """`stanchion dlq list` shows the dead letter; `stanchion dlq replay` republishes it once it can be
    answered, and it gets exactly one result."""
    provider = fake_openai(always="401")
    policy = policy_for(("primary", provider), heuristic=False)
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "dlq-1", "text": "cannot log in"})
        await svc.collector.wait_for(dead=1)
        settings = svc.settings
        env = clean_env(
            NATS_URL=nats_server.url,
            STANCHION_DLQ_STREAM=settings.dlq_stream,
            STANCHION_INPUT_SUBJECT=settings.input_subject,
            COLUMNS="200",
        )
        listed = await asyncio.to_thread(
            subprocess.run,
            [STANCHION, "dlq", "list"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert "dlq-1" in listed.stdout and "failed" in listed.stdout and settings.input_subject in listed.stdout

        provider.set(always="ok")
        args = ["--id", "dlq-1"] if replay_how == "--id" else ["--all"]
        replayed = await asyncio.to_thread(
            subprocess.run,
            [STANCHION, "dlq", "replay", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 1" in replayed.stdout
        await svc.collector.wait_for(results=1)
        await asyncio.sleep(0.5)
        results = await read_stream(svc.client, settings.output_stream)
        dead = await read_stream(svc.client, settings.dlq_stream)
    assert [r["event_id"] for r in svc.collector.results] == ["dlq-1"]
    assert [r["event_id"] for r in results] == ["dlq-1"]
    assert dead == []  # the replayed dead letter left the stream
    assert provider.count == 2


async def test_sigterm_naks_in_flight_events_after_the_grace_period(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """SIGTERM with an event stuck in a slow model call: the service exits within the grace period and hands
    the event back at once (nak), so the next instance answers it long before the ack wait would have."""
    provider = fake_openai(latency_s=30.0)
    settings = unique_settings(nats_server.url)
    env = service_env(
        settings,
        OPENAI_API_KEY="sk-test-term",
        OPENAI_BASE_URL=provider.base_url,
        STANCHION_SHUTDOWN_GRACE_S="1",
        STANCHION_ATTEMPT_TIMEOUT_S="60",
        STANCHION_DEADLINE_S="90",
    )
    client = await nats.connect(nats_server.url)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    first = start_service(env, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for_consumer(client, settings, first)
        await publish_all(client, settings.input_subject, ["term-1"])
        async with asyncio.timeout(30):
            while provider.count == 0:
                await asyncio.sleep(0.05)
        stopping = time.monotonic()
        os.kill(first.pid, signal.SIGTERM)
        code = await asyncio.to_thread(first.wait, 30)
        stopped_after = time.monotonic() - stopping
        provider.latency_s = 0.0
        second = start_service(env, tmp_path)
        await collector.wait_for(results=1, timeout=30)
    finally:
        await client.close()
        stop_service(first)
        stop_service(second)
    assert code == 0
    assert stopped_after < 10
    assert [r["event_id"] for r in collector.results] == ["term-1"]


async def test_transient_exhaustion_is_dead_lettered_with_every_cause_after_max_deliveries(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """No heuristic, provider answering 503 for good (breaker kept out of the way): the event is nak'ed and
    redelivered, retried in-process only on its first delivery, then dead-lettered as exhausted."""
    provider = fake_openai(always="503")
    policy = policy_for(
        ("primary", provider),
        heuristic=False,
        retry={"attempts": 3, "initial_s": 0.01, "max_s": 0.02},
        breaker={"consecutive_failures": 1000, "min_calls": 1000, "window": 1000},
    )
    async with running_service(nats_server.url, policy, max_deliver=3, nak_backoff_s=(0.1, 0.2)) as svc:
        await svc.publish({"id": "exhaust-1", "text": "export fails"})
        await svc.collector.wait_for(dead=1, timeout=30)
        await asyncio.sleep(0.5)
        results = await read_stream(svc.client, svc.settings.output_stream)
        dead = await read_stream(svc.client, svc.settings.dlq_stream)
    [letter] = dead
    assert letter["event_id"] == "exhaust-1"
    assert letter["error_type"] == "exhausted"
    assert letter["deliveries"] == 3
    assert letter["models_tried"] == ["primary"]
    assert letter["errors"] and all("503" in e for e in letter["errors"])
    assert results == []
    assert provider.count == 3 + 1 + 1  # 3 attempts on the first delivery, one on each redelivery


async def test_dlq_replay_with_a_policy_replays_only_what_that_policy_can_answer(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """`dlq replay --all --policy FILE` skips poison and events the policy would send to the same wall, and
    replays the rest."""
    provider = fake_openai(always="401")
    policy = policy_for(("primary", provider), heuristic=False)
    same_wall = tmp_path / "same.toml"
    same_wall.write_text(
        f'[[models]]\nname = "primary"\nmodel = "openai-chat:m"\nbase_url = "{provider.base_url}"\n\n'
        '[routes.default]\nmodels = ["primary"]\nheuristic = false\n'
    )
    with_heuristic = tmp_path / "fixed.toml"
    with_heuristic.write_text(same_wall.read_text().replace("heuristic = false", "heuristic = true"))
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "wall-1", "text": "cannot log in"})
        await svc.publish(b"{not json")
        await svc.collector.wait_for(dead=2)
        env = clean_env(NATS_URL=nats_server.url, STANCHION_DLQ_STREAM=svc.settings.dlq_stream)

        def replay(policy_file: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [STANCHION, "dlq", "replay", "--all", "--policy", str(policy_file)],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )

        blocked = await asyncio.to_thread(replay, same_wall)
        assert blocked.returncode == 0, blocked.stderr
        assert "replayed 0" in blocked.stdout and blocked.stderr.count("skipped") == 2
        assert provider.count == 1

        fixed = await asyncio.to_thread(replay, with_heuristic)
        assert fixed.returncode == 0, fixed.stderr
        assert "replayed 1" in fixed.stdout and "poison.json" in fixed.stderr
        await svc.collector.wait_for(dead=3)  # the running service still has no heuristic: it fails again
        dead = await read_stream(svc.client, svc.settings.dlq_stream)
    assert sorted(d["error_type"] for d in dead) == ["failed", "poison.json"]
    assert provider.count == 2

    bad = await asyncio.to_thread(
        subprocess.run,
        [STANCHION, "dlq", "replay", "--all", "--policy", str(tmp_path / "missing.toml")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--policy" in bad.stderr and "Traceback" not in bad.stderr
