"""A three-node JetStream cluster: every stream and the result bucket on three servers, a node lost under load.

One cluster serves the module (starting one takes seconds); each test uses subjects, streams and buckets of its own.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from stanchion.handlers.classify.app import create_app
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.nats.results import KeyValueResultStore
from stanchion.handlers.runtime.results import StoredResult
from stanchion.handlers.settings import Settings
from tests.cluster import NatsCluster
from tests.conftest import (
    assert_each_accounted_once,
    policy_for,
    read_stream,
    service_env,
    start_service,
    stop_service,
    unique_settings,
)
from tests.fake_openai import FakeOpenAI

_buckets = itertools.count()

T = TypeVar("T")


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    async with NatsCluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


async def output_count(client: Client, stream: str) -> int:
    """Results the output stream holds (from whichever node answers: the client may have moved)."""
    return (await client.jetstream().stream_info(stream)).state.messages


async def test_the_leader_of_the_input_stream_killed_mid_stream_loses_nothing_and_answers_go_on(
    cluster: NatsCluster, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """Three nodes, every stream and the result bucket on all three, NATS_URL listing them: 1,000 events, the node
    leading the input stream SIGKILLed mid-stream and started again later. Answers go on while it is down, and
    every event has exactly one result."""
    provider = fake_openai(latency_s=0.02)
    settings = unique_settings(cluster.url)
    env = service_env(
        settings, OPENAI_API_KEY="sk-test-cluster", OPENAI_BASE_URL=provider.base_url, STANCHION_STREAM_REPLICAS="3"
    )
    ids = [f"cluster-{i}" for i in range(1000)]
    client = await nats.connect(cluster.servers, reconnect_time_wait=0.1)
    js = client.jetstream()
    service: subprocess.Popen[bytes] | None = None
    killed: int | None = None
    try:
        service = start_service(env, tmp_path)
        await _consumer_up(client, settings, service)
        for event_id in ids:
            event = {"id": event_id, "text": f"checkout crashes ({event_id})"}
            await js.publish(settings.input_subject, json.dumps(event).encode())
        await _answers(client, settings.output_stream, 250, service)
        killed = await cluster.leader(client, settings.input_stream)
        at_kill = await output_count(client, settings.output_stream)
        cluster.kill(killed)
        while_down = await _answers(client, settings.output_stream, at_kill + 250, service)  # the node still down
        leader_while_down = await _settled(lambda: cluster.leader(client, settings.input_stream))
        await cluster.restart(killed)
        killed = None
        await _answers(client, settings.output_stream, len(ids), service)
        results = await _settled(lambda: read_stream(client, settings.output_stream))
        dead = await _settled(lambda: read_stream(client, settings.dlq_stream))
        streams = (settings.input_stream, settings.output_stream, settings.dlq_stream, f"KV_{settings.result_bucket}")
        replicas = [(await _settled(functools.partial(js.stream_info, name))).config.num_replicas for name in streams]
    finally:
        if killed is not None:
            await cluster.restart(killed)
        stop_service(service, signal.SIGTERM)
        await client.close()
    assert while_down >= at_kill + 250
    assert leader_while_down != killed
    assert_each_accounted_once(ids, results, dead)
    assert dead == []
    assert replicas == [3, 3, 3, 3]


async def _consumer_up(client: Client, settings: Settings, service: subprocess.Popen[bytes]) -> None:
    """Until the service has its durable (a request about it may go unanswered while its R3 stream elects a
    leader: asked again)."""
    async with asyncio.timeout(60):
        while True:
            assert service.poll() is None, "the service exited"
            try:
                await client.jetstream().consumer_info(settings.input_stream, settings.durable)
                return
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.2)


async def _settled(request: Callable[[], Awaitable[T]]) -> T:
    """``request`` (the test's own look at the streams), asked again while the cluster elects a new leader."""
    for _ in range(30):
        try:
            return await request()
        except (nats.errors.Error, TimeoutError):
            await asyncio.sleep(0.5)
    return await request()


async def _answers(client: Client, stream: str, count: int, service: subprocess.Popen[bytes]) -> int:
    """Wait until the output stream holds ``count`` results (or fail when the service exits); how many it holds."""
    async with asyncio.timeout(120):
        while (held := await _settled(lambda: output_count(client, stream))) < count:
            assert service.poll() is None, "the service exited"
            await asyncio.sleep(0.2)
    return held


async def test_a_replicated_result_bucket_is_read_through_its_leader(cluster: NatsCluster) -> None:
    """On three servers the store creates the bucket without direct gets, and asks the stream leader for every
    lookup (a direct get may be answered by a follower that has not applied the last put yet), even from a bucket
    someone else created with direct gets allowed."""
    client = await nats.connect(cluster.servers)
    asked: list[str] = []

    async def record(msg: Msg) -> None:
        asked.append(msg.subject)

    try:
        ours, theirs = f"c{next(_buckets)}_results", f"c{next(_buckets)}_results"
        await client.jetstream().create_key_value(bucket=theirs, history=1, replicas=3, direct=True)
        for bucket in (ours, theirs):
            await client.subscribe(f"$JS.API.DIRECT.GET.KV_{bucket}.>", cb=record)
            await client.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", cb=record)
        for bucket in (ours, theirs):
            store = KeyValueResultStore(lambda: client, bucket, ttl_s=60, replicas=3)
            await store.put("e-1", StoredResult(b'{"event_id": "e-1"}', published=False))
            assert await store.get("e-1") == StoredResult(b'{"event_id": "e-1"}', published=False)
            assert await store.get("e-2") is None
        config = (await client.jetstream().stream_info(f"KV_{ours}")).config
        await client.flush()
    finally:
        await client.close()
    assert (config.num_replicas, config.allow_direct) == (3, False)
    assert asked == [f"$JS.API.STREAM.MSG.GET.KV_{b}" for b in (ours, ours, theirs, theirs)]


async def test_a_put_and_a_lookup_wait_for_the_new_leader_when_the_bucket_leader_is_lost(
    cluster: NatsCluster,
) -> None:
    """The node leading a replicated result bucket SIGKILLed: a put and a lookup made at once are tried again until
    the others have elected a new leader, instead of failing (which would throw an answer away)."""
    client = await nats.connect(cluster.servers, reconnect_time_wait=0.1)
    bucket = f"c{next(_buckets)}_results"
    store = KeyValueResultStore(lambda: client, bucket, ttl_s=60, replicas=3)
    killed: int | None = None
    try:
        await store.put("before", StoredResult(b'{"event_id": "before"}', published=False))
        killed = await cluster.leader(client, store.stream)
        cluster.kill(killed)
        await store.put("after", StoredResult(b'{"event_id": "after"}', published=False))
        found = (await store.get("before"), await store.get("after"))
        leader = await cluster.leader(client, store.stream)
    finally:
        if killed is not None:
            await cluster.restart(killed)
        await client.close()
    assert found == (
        StoredResult(b'{"event_id": "before"}', published=False),
        StoredResult(b'{"event_id": "after"}', published=False),
    )
    assert leader != killed


async def test_a_bucket_on_one_server_keeps_direct_gets(nats_server: EmbeddedNats) -> None:
    """On a single server the store reads with direct gets (no follower to lag; the cheaper request)."""
    client = await nats.connect(nats_server.url)
    asked: list[str] = []

    async def record(msg: Msg) -> None:
        asked.append(msg.subject.partition(".$KV.")[0])

    try:
        bucket = f"c{next(_buckets)}_results"
        await client.subscribe(f"$JS.API.DIRECT.GET.KV_{bucket}.>", cb=record)
        await client.subscribe(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", cb=record)
        store = KeyValueResultStore(lambda: client, bucket, ttl_s=60)
        await store.put("e-1", StoredResult(b"{}", published=False))
        assert await store.get("e-1") == StoredResult(b"{}", published=False)
        await client.flush()
    finally:
        await client.close()
    assert asked == [f"$JS.API.DIRECT.GET.KV_{bucket}"]


async def test_more_replicas_than_servers_is_one_line_at_start_up(nats_server: EmbeddedNats) -> None:
    """STANCHION_STREAM_REPLICAS=3 on a single server: the app does not start, and says so in one line naming the
    setting, before any stream is created."""
    settings = unique_settings(nats_server.url, stream_replicas=3)
    app, _ = create_app(settings, policy_for())
    with pytest.raises(ConfigError, match="STANCHION_STREAM_REPLICAS=3") as raised:
        async with asyncio.timeout(30), app:
            pass
    assert "\n" not in str(raised.value)
    client = await nats.connect(nats_server.url)
    try:
        names = [info.config.name for info in await client.jetstream().streams_info()]
    finally:
        await client.close()
    assert settings.input_stream not in names and f"KV_{settings.result_bucket}" not in names


async def test_the_result_bucket_is_in_place_on_every_server_before_the_first_event(cluster: NatsCluster) -> None:
    """With STANCHION_STREAM_REPLICAS=3 the app's start puts the result bucket on three servers (the store would
    create it on one on first use), without direct gets."""
    settings = unique_settings(cluster.url, stream_replicas=3)
    app, _ = create_app(settings, policy_for(), url=cluster.url)
    client = await nats.connect(cluster.servers)
    try:
        async with asyncio.timeout(60), app:
            config = (await client.jetstream().stream_info(f"KV_{settings.result_bucket}")).config
    finally:
        await client.close()
    assert (config.num_replicas, config.allow_direct, config.max_age) == (3, False, settings.result_ttl_s)


async def test_a_result_bucket_on_one_server_is_scaled_up_at_start_up(cluster: NatsCluster) -> None:
    """A result bucket already there on one server (a deployment that grew into a cluster) is on three once an app
    with STANCHION_STREAM_REPLICAS=3 has started, with what it held."""
    settings = unique_settings(cluster.url, stream_replicas=3)
    client = await nats.connect(cluster.servers)
    try:
        kv = await client.jetstream().create_key_value(bucket=settings.result_bucket, history=1, replicas=1)
        await kv.put("kept", b"S{}")
        app, _ = create_app(settings, policy_for(), url=cluster.url)
        async with asyncio.timeout(60), app:
            config = (await client.jetstream().stream_info(f"KV_{settings.result_bucket}")).config
            kept = (await kv.get("kept")).value
    finally:
        await client.close()
    assert (config.num_replicas, kept) == (3, b"S{}")
