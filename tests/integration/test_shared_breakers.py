"""Breakers shared by replicas through the KV bucket: `stanchion run` processes on one nats-server and fake providers.

Three processes with ``STANCHION_REPLICAS=3`` trip one breaker between them, so a provider that is down receives
the trip threshold once, not once per replica; the bucket deleted under a running service is put back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from stanchion.handlers.nats.breakers import read_breakers
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.settings import Settings
from stanchion.middleware import BreakerState
from tests.conftest import (
    STANCHION,
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

DOWN = "breaker bucket unavailable: breakers go on with their last known state and local counts"


def policy_file(directory: Path, primary: FakeOpenAI, backup: FakeOpenAI) -> Path:
    """Primary then backup, no heuristic (every answer is a model's), breaker and retry at their defaults."""
    path = directory / "policy.toml"
    path.write_text(
        "\n".join(
            f'[[models]]\nname = "{name}"\nmodel = "openai-chat:gpt-4o-mini"\nbase_url = "{server.base_url}"\n'
            'api_key_env = "OPENAI_API_KEY"\noutput_mode = "tool"\n'
            for name, server in (("primary", primary), ("backup", backup))
        )
        + '\n[routes.default]\nmodels = ["primary", "backup"]\nheuristic = false\n'
    )
    return path


def with_breaker_bucket(settings: Settings) -> Settings:
    """A breaker bucket of the test's own (named after its result bucket)."""
    return settings.model_copy(update={"breaker_bucket": settings.result_bucket.replace("results", "breakers")})


def environment(settings: Settings, policy: Path, **extra: str) -> dict[str, str]:
    return service_env(
        settings,
        OPENAI_API_KEY="sk-test-shared",
        STANCHION_POLICY=str(policy),
        STANCHION_BREAKER_BUCKET=settings.breaker_bucket,
        **extra,
    )


async def publish(client: Client, settings: Settings, ids: list[str]) -> None:
    js = client.jetstream()
    for event_id in ids:
        await js.publish(
            settings.input_subject, json.dumps({"id": event_id, "text": f"sync fails ({event_id})"}).encode()
        )


async def state_of(client: Client, bucket: str, key: str) -> BreakerState | None:
    """The state of one shared breaker as the bucket holds it (``None``: no record, or no bucket)."""
    record = (await read_breakers(client.jetstream(), bucket)).get(key)
    return record.state if record is not None else None


async def watchers(client: Client, bucket: str) -> int:
    """How many stores watch the bucket (each started store has one consumer on it)."""
    try:
        return (await client.jetstream().stream_info(f"KV_{bucket}")).state.consumer_count
    except NotFoundError:
        return 0


async def test_three_replicas_trip_one_shared_breaker(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """Three replicas, 2 in flight each, primary always 503, backup healthy, 150 events: all answered by backup,
    none lost or duplicated, and primary receives at most 5 (the trip) + 6 (the calls in flight on the three
    replicas) + 1 (a probe) requests, retries included; per-process breakers would let about three times the
    threshold through."""
    primary, backup = fake_openai(always="503"), fake_openai()
    settings = with_breaker_bucket(unique_settings(nats_server.url))
    env = environment(
        settings, policy_file(tmp_path, primary, backup), STANCHION_REPLICAS="3", STANCHION_MAX_IN_FLIGHT="2"
    )
    ids = [f"shared-{i}" for i in range(150)]
    client = await nats.connect(nats_server.url)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
    services: list[subprocess.Popen[bytes]] = []
    try:
        services = [start_service(env, tmp_path) for _ in range(3)]
        await wait_for_consumer(client, settings, services[0], timeout=60)
        async with asyncio.timeout(60):  # every replica started: its breaker store watches the bucket
            while await watchers(client, settings.breaker_bucket) < 3:
                assert all(s.poll() is None for s in services), "a service process exited"
                await asyncio.sleep(0.1)
        await publish(client, settings, ids)
        await collector.wait_for(results=len(ids), timeout=120)
        results = await read_stream(client, settings.output_stream)
        dead = await read_stream(client, settings.dlq_stream)
        shared = await read_breakers(client.jetstream(), settings.breaker_bucket)
        report_env = {**env, "COLUMNS": "200"}
        report = await asyncio.to_thread(
            subprocess.run, [STANCHION, "report"], env=report_env, capture_output=True, text=True, timeout=60
        )
        as_json = await asyncio.to_thread(
            subprocess.run, [STANCHION, "report", "--json"], env=report_env, capture_output=True, text=True, timeout=60
        )
    finally:
        for service in services:
            stop_service(service)
        await client.close()
    # The report shows the shared breaker once, beside the handler, not once per replica.
    assert report.returncode == 0, report.stderr
    [line] = [line for line in report.stdout.splitlines() if line.startswith("breakers, shared by the replicas: ")]
    assert "primary open for" in line and report.stdout.count("shared by the replicas") == 1, report.stdout
    assert report.stdout.count("breakers: shared (above)") == 4  # three replicas and the combined table
    [section] = json.loads(as_json.stdout)["handlers"]
    assert section["shared_breakers"]["primary"]["state"] == "open" and len(section["replicas"]) == 3
    assert_each_accounted_once(ids, results, dead)
    assert dead == []
    assert {r["model"] for r in results} == {"backup"}
    assert primary.count <= 5 + 6 + 1, f"primary received {primary.count} requests"
    assert primary.count >= 5
    assert shared["primary"].state is BreakerState.OPEN
    assert "backup" not in shared or shared["backup"].state is BreakerState.CLOSED


async def test_the_breaker_bucket_deleted_while_the_service_runs(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """The shared bucket deleted under a running service with primary's circuit open: events keep being answered
    (by backup, primary still shed: the last known state holds), the service logs it once, and the bucket is
    created again with the open circuit in it."""
    primary, backup = fake_openai(always="503"), fake_openai()
    settings = with_breaker_bucket(unique_settings(nats_server.url))
    env = environment(settings, policy_file(tmp_path, primary, backup), STANCHION_BREAKER_STORE="kv")
    before, after = [f"before-{i}" for i in range(20)], [f"after-{i}" for i in range(20)]
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    service: subprocess.Popen[bytes] | None = None
    try:
        service = start_service(env, tmp_path)
        await wait_for_consumer(client, settings, service, timeout=60)
        await publish(client, settings, before)
        await collector.wait_for(results=len(before), timeout=60)
        async with asyncio.timeout(10):
            while await state_of(client, settings.breaker_bucket, "primary") is not BreakerState.OPEN:
                await asyncio.sleep(0.05)
        tripped_with = primary.count

        await js.delete_key_value(settings.breaker_bucket)
        await publish(client, settings, after)
        await collector.wait_for(results=len(before) + len(after), timeout=60)
        async with asyncio.timeout(10):  # recreated, and the open circuit written back
            while (recreated := await state_of(client, settings.breaker_bucket, "primary")) is None:
                await asyncio.sleep(0.05)
        results = await read_stream(client, settings.output_stream)
        dead = await read_stream(client, settings.dlq_stream)
    finally:
        stop_service(service)
        await client.close()
    assert_each_accounted_once(before + after, results, dead)
    assert {r["model"] for r in results} == {"backup"}
    assert primary.count == tripped_with  # still open after the deletion: primary not asked again
    assert recreated is BreakerState.OPEN
    log = (tmp_path / "service.log").read_text()
    assert log.count(DOWN) == 1, log[-3000:]
    assert log.count("recreated the missing breaker bucket") == 1
