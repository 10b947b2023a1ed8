"""The FastStream handler on a real nats-server, against real HTTP providers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable

from stanchion.contracts import DeadLetter, ResultEnvelope, TaskClassification
from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import policy_for, read_stream, running_service, unique_settings
from tests.fake_openai import FakeOpenAI


async def test_twenty_events_are_answered_by_the_model(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Twenty valid events give twenty typed result envelopes with matching ids, served by the model."""
    provider = fake_openai()
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        ids = [f"e-{i}" for i in range(20)]
        for event_id in ids:
            await svc.publish({"id": event_id, "text": f"the export button crashes ({event_id})"})
        await svc.collector.wait_for(results=20)
    envelopes = [ResultEnvelope[TaskClassification].model_validate(r) for r in svc.collector.results]
    assert sorted(e.event_id for e in envelopes) == sorted(ids)
    assert all(e.model == "primary" and not e.degraded and e.attempts == 1 for e in envelopes)
    assert all(e.usage.input_tokens > 0 and e.usage.output_tokens > 0 for e in envelopes)
    assert provider.count == 20
    assert svc.collector.dead == []


async def test_backup_serves_when_primary_answers_503(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """With the primary always failing, every event is served by the backup, not degraded."""
    primary, backup = fake_openai(always="503"), fake_openai()
    policy = policy_for(("primary", primary), ("backup", backup), retry={"attempts": 2, "initial_s": 0.01})
    async with running_service(nats_server.url, policy) as svc:
        for i in range(5):
            await svc.publish({"id": f"b-{i}", "text": "feature: add CSV export"})
        await svc.collector.wait_for(results=5)
    assert {r["model"] for r in svc.collector.results} == {"backup"}
    assert not any(r["degraded"] for r in svc.collector.results)
    assert primary.count >= 1
    assert backup.count == 5


async def test_invalid_payloads_become_dead_letters_and_the_service_keeps_answering(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Five kinds of poison become five dead letters with a readable reason; a valid event is still answered."""
    provider = fake_openai()
    poison: dict[str, bytes] = {
        "poison.json": b"{not json",
        "poison.schema": b'{"id": "s-1", "text": ""}',
        "poison.empty": b"",
        "poison.encoding": b"\xff\xfe\x00garbage",
        "poison.too_large": b'{"id": "big", "text": "' + b"x" * 70_000 + b'"}',
    }
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        for data in poison.values():
            await svc.publish(data)
        await svc.collector.wait_for(dead=5)
        await svc.publish({"id": "after-poison", "text": "how do I rotate keys?"})
        await svc.collector.wait_for(results=1)
    dead = [DeadLetter.model_validate(d) for d in svc.collector.dead]
    assert sorted(d.error_type for d in dead) == sorted(poison)
    by_type = {d.error_type: d for d in dead}
    assert all(d.reason and d.subject == svc.settings.input_subject for d in dead)
    assert "text" in by_type["poison.schema"].reason and by_type["poison.schema"].event_id == "s-1"
    assert by_type["poison.encoding"].payload_encoding == "base64"
    assert base64.b64decode(by_type["poison.encoding"].payload) == poison["poison.encoding"]
    assert by_type["poison.too_large"].payload_truncated
    assert by_type["poison.json"].payload == "{not json"
    assert [r["event_id"] for r in svc.collector.results] == ["after-poison"]
    assert provider.count == 1


async def test_every_model_unreachable_degrades_to_the_heuristic(nats_server: EmbeddedNats) -> None:
    """With no model reachable, the heuristic answers and the envelope says so."""
    dead_port = FakeOpenAI()  # never started: nothing listens on its URL
    dead_port.port = 9
    async with running_service(nats_server.url, policy_for(("primary", dead_port), retry={"attempts": 1})) as svc:
        await svc.publish({"id": "h-1", "text": "URGENT: production is down, login crashes"})
        await svc.collector.wait_for(results=1)
    [result] = svc.collector.results
    assert result["model"] == "heuristic" and result["degraded"] is True
    assert result["result"]["category"] == "bug" and result["result"]["priority"] == 5
    assert [d["kind"] for d in result["decisions"]][:1] == ["route"]
    assert any(d["kind"] == "degraded" for d in result["decisions"])


async def test_an_existing_durable_consumer_is_brought_up_to_the_settings(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Restarted with other max deliveries, ack wait and concurrency, the service updates its durable consumer
    (FastStream alone would attach to it with the old config)."""
    provider = fake_openai()
    settings = unique_settings(nats_server.url, max_deliver=5, ack_wait_s=60.0, max_in_flight=8)
    async with running_service(nats_server.url, policy_for(("primary", provider)), settings=settings) as svc:
        before = await svc.client.jetstream().consumer_info(settings.input_stream, settings.durable)
    changed = settings.model_copy(update={"max_deliver": 3, "ack_wait_s": 30.0, "max_in_flight": 2})
    async with running_service(nats_server.url, policy_for(("primary", provider)), settings=changed) as svc:
        after = await svc.client.jetstream().consumer_info(settings.input_stream, settings.durable)
        await svc.publish({"id": "reconciled", "text": "still answering?"})
        await svc.collector.wait_for(results=1)
    # max_ack_pending: the workers and one pull batch (at most 8) waiting for them.
    assert (before.config.max_deliver, before.config.ack_wait, before.config.max_ack_pending) == (5, 60.0, 16)
    assert (after.config.max_deliver, after.config.ack_wait, after.config.max_ack_pending) == (3, 30.0, 4)


async def test_an_answer_slower_than_the_ack_wait_is_kept_alive_not_redelivered(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """The model takes three ack waits to answer: the handler's in-progress beats keep the message its own, so
    JetStream does not deliver it again (which would call the model a second time)."""
    provider = fake_openai(latency_s=3.0)
    policy = policy_for(("primary", provider))
    async with running_service(nats_server.url, policy, ack_wait_s=1.0, attempt_timeout_s=10.0) as svc:
        await svc.publish({"id": "slow-1", "text": "the export button crashes"})
        await svc.collector.wait_for(results=1, timeout=30)
        await asyncio.sleep(1.5)  # a redelivery would have shown by now
        info = await svc.client.jetstream().consumer_info(svc.settings.input_stream, svc.settings.durable)
    [result] = svc.collector.results
    assert result["model"] == "primary" and not result["degraded"]
    assert provider.count == 1
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


async def test_the_provider_clients_are_closed_once_the_app_has_stopped(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """The models' HTTP clients stay open while the app runs and are closed after it stopped."""
    provider = fake_openai()
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        await svc.publish({"id": "close-1", "text": "the export button crashes"})
        await svc.collector.wait_for(results=1)
        clients = [c.target.model.client for c in svc.service.candidates.values()]
        assert clients
        assert not any(client.is_closed() for client in clients)
    assert all(client.is_closed() for client in clients)


async def test_hostile_ids_are_dead_lettered_and_the_events_around_them_answered(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Ids with CR, LF, NUL, a lone surrogate or 10k characters: one dead letter each, with its reason; the valid
    events published between them are answered at once; every event is accounted for exactly once."""
    provider = fake_openai()
    hostile = ['"cr\\rid"', '"lf\\nid"', '"nul\\u0000id"', '"sur-\\ud800"', '"' + "x" * 10_000 + '"']
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        valid = []
        for i, raw_id in enumerate(hostile):
            await svc.publish(f'{{"id": {raw_id}, "text": "the export crashes"}}'.encode())
            valid.append(f"ok-{i}")
            await svc.publish({"id": valid[-1], "text": "the export crashes"})
        await svc.collector.wait_for(results=len(valid), dead=len(hostile), timeout=30)
        await asyncio.sleep(0.3)  # nothing more arrives
    assert sorted(r["event_id"] for r in svc.collector.results) == sorted(valid)
    assert len(svc.collector.dead) == len(hostile)
    reasons = sorted(d["reason"] for d in svc.collector.dead)
    assert all(d["error_type"] in ("poison.id", "poison.schema") and d["event_id"] is None for d in svc.collector.dead)
    assert any("control character ('\\r')" in r for r in reasons)
    assert any("control character ('\\n')" in r for r in reasons)
    assert any("control character ('\\x00')" in r for r in reasons)
    assert any("lone surrogate" in r or "unicode string" in r for r in reasons)
    assert any("id" in r and ("10000" in r or "at most 200" in r) for r in reasons)


async def test_output_and_dead_letter_streams_are_bounded_by_age_and_size(nats_server: EmbeddedNats) -> None:
    """The output and dead-letter streams keep messages for their max age and size cap: they never grow without end."""
    settings = unique_settings(nats_server.url, output_max_age_s=3600.0, dlq_max_age_s=7200.0, dlq_max_bytes=1 << 20)
    async with running_service(nats_server.url, policy_for(), settings=settings) as svc:
        js = svc.client.jetstream()
        output = (await js.stream_info(settings.output_stream)).config
        dead = (await js.stream_info(settings.dlq_stream)).config
    assert (output.max_age, output.max_bytes, output.duplicate_window) == (3600.0, -1, 3600.0)
    assert (dead.max_age, dead.max_bytes) == (7200.0, 1 << 20)


async def test_an_id_reused_with_other_content_is_a_conflict_dead_letter_not_a_silent_drop(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Same id, same content: answered once. Same id, other content: one ``conflict.id`` dead letter naming the id
    and both content hashes and keeping the new payload; the model is asked once."""
    provider = fake_openai()
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        await svc.publish({"id": "dup", "text": "the export crashes"})
        await svc.collector.wait_for(results=1)
        await svc.publish({"id": "dup", "text": "  the export crashes  "})  # same content once stripped
        await svc.publish({"id": "dup", "text": "please add dark mode"})
        await svc.collector.wait_for(results=1, dead=1)
        await asyncio.sleep(0.5)
    results = svc.collector.results
    assert [r["event_id"] for r in results] == ["dup"]
    [dead] = svc.collector.dead
    assert dead["error_type"] == "conflict.id" and dead["event_id"] == "dup"
    assert "already answered for other content" in dead["reason"] and dead["reason"].count("sha256 ") == 2
    assert "dark mode" in dead["payload"]
    assert provider.count == 1


async def test_a_provider_quoting_the_key_in_its_answer_never_gets_it_published_or_stored(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """The answer's text quotes the API key: the result on the output stream and the stored result have it masked."""
    secret = "sk-test-quoted-0123456789"
    provider = fake_openai(quote_auth=True)
    settings = unique_settings(nats_server.url, openai_api_key=secret)
    policy = policy_for(("primary", provider), model_options={"primary": {"api_key_env": "STANCHION_TEST_KEY"}})
    os.environ["STANCHION_TEST_KEY"] = secret
    try:
        async with running_service(nats_server.url, policy, settings=settings) as svc:
            await svc.publish({"id": "quote-1", "text": "the export crashes"})
            await svc.collector.wait_for(results=1)
            kv = await svc.client.jetstream().key_value(settings.result_bucket)
            stored = [(await kv.get(key)).value or b"" for key in await kv.keys()]
            published = await read_stream(svc.client, settings.output_stream)
    finally:
        del os.environ["STANCHION_TEST_KEY"]
    [result] = svc.collector.results
    assert "Bearer ***" in result["result"]["summary"]
    assert secret not in json.dumps(published) and secret not in json.dumps(result)
    assert stored and all(secret.encode() not in value for value in stored)
