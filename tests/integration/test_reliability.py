"""The reliability stack through the real NATS handler, against real HTTP providers that misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import policy_for, running_service
from tests.fake_openai import FakeOpenAI


async def test_rate_limited_twice_then_served_by_the_same_candidate(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """429 with Retry-After: 1 twice, then success: one result, 3 attempts, waits of at least 1 s honoured."""
    primary = fake_openai(retry_after=1.0)
    backup = fake_openai()
    primary.set(script=["429", "429"])
    policy = policy_for(("primary", primary), ("backup", backup), retry={"attempts": 3, "initial_s": 0.01})
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "rl-1", "text": "the sync job fails"})
        await svc.collector.wait_for(results=1)
        await asyncio.sleep(0.2)
    [result] = svc.collector.results
    assert result["model"] == "primary" and result["attempts"] == 3 and not result["degraded"]
    times = [r.at for r in primary.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 1.0 and times[2] - times[1] >= 1.0
    assert [d["data"]["wait_s"] for d in result["decisions"] if d["kind"] == "retry"] == [1.0, 1.0]
    assert backup.count == 0


async def test_breaker_sheds_a_failing_primary_and_lets_it_back_after_a_probe(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Primary always 503: 50 events all served by backup, primary called no more than the trip threshold plus
    one probe; once primary recovers and the open time passes, a probe succeeds and traffic returns to it."""
    primary, backup = fake_openai(always="503"), fake_openai()
    threshold, open_s = 3, 2.0
    policy = policy_for(
        ("primary", primary),
        ("backup", backup),
        retry={"attempts": 3, "initial_s": 0.01, "max_s": 0.05},
        breaker={"consecutive_failures": threshold, "open_s": open_s, "half_open_probes": 1},
    )
    async with running_service(nats_server.url, policy, max_in_flight=1) as svc:
        for i in range(50):
            await svc.publish({"id": f"cb-{i}", "text": "please add CSV export"})
        await svc.collector.wait_for(results=50, timeout=60)
        assert {r["model"] for r in svc.collector.results} == {"backup"}
        probes = sum(d["detail"] == "open -> half_open" for r in svc.collector.results for d in r["decisions"])
        assert primary.count <= threshold + probes
        assert probes <= 5
        rejected = [r for r in svc.collector.results if any(d["detail"] == "rejected" for d in r["decisions"])]
        assert len(rejected) >= 45

        primary.set(always="ok")
        await asyncio.sleep(open_s + 0.2)
        before = primary.count
        for i in range(5):
            await svc.publish({"id": f"cb-back-{i}", "text": "please add CSV export"})
        await svc.collector.wait_for(results=55)
    back = [r for r in svc.collector.results if r["event_id"].startswith("cb-back-")]
    assert {r["model"] for r in back} == {"primary"}
    assert primary.count - before == 5
    transitions = [d["detail"] for r in back for d in r["decisions"] if d["kind"] == "breaker"]
    assert "open -> half_open" in transitions and "half_open -> closed" in transitions


async def test_every_candidate_down_degrades_without_waiting_once_breakers_are_open(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Both candidates hang: events are answered by the heuristic, and once the breakers are open the answer
    comes without waiting for any provider timeout."""
    primary, backup = fake_openai(always="slow", slow_s=5.0), fake_openai(always="slow", slow_s=5.0)
    attempt_s = 0.4
    policy = policy_for(
        ("primary", primary),
        ("backup", backup),
        retry={"attempts": 1},
        timeout={"attempt_s": attempt_s},
        breaker={"consecutive_failures": 2, "open_s": 60},
    )
    async with running_service(nats_server.url, policy, max_in_flight=1) as svc:
        for i in range(8):
            await svc.publish({"id": f"down-{i}", "text": "URGENT outage: checkout crashes"})
        await svc.collector.wait_for(results=8, timeout=60)
    results = {r["event_id"]: r for r in svc.collector.results}
    assert all(r["model"] == "heuristic" and r["degraded"] for r in results.values())
    assert results["down-0"]["latency_ms"] >= 2 * attempt_s * 1000 * 0.9
    late = [results[f"down-{i}"] for i in range(4, 8)]
    assert all(r["latency_ms"] < attempt_s * 1000 / 2 for r in late)
    assert all(r["attempts"] == 0 for r in late)
    assert primary.count == 2 and backup.count == 2


async def test_schema_invalid_output_escalates_to_the_backup_after_output_retries(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """Primary returns schema-invalid output every time: after its output retries, backup serves."""
    primary, backup = fake_openai(always="invalid"), fake_openai()
    policy = policy_for(("primary", primary), ("backup", backup), model_options={"primary": {"output_retries": 2}})
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "inv-1", "text": "what is the SLA?"})
        await svc.collector.wait_for(results=1)
    [result] = svc.collector.results
    assert result["model"] == "backup" and not result["degraded"]
    assert primary.count == 3  # the first answer plus 2 output retries, each re-prompted with the errors
    assert "priority" in str(primary.requests[-1].body["messages"])
    fallback = [d for d in result["decisions"] if d["kind"] == "fallback"]
    assert fallback[0]["model"] == "primary" and fallback[0]["data"]["failure"] == "permanent"


async def test_an_auth_error_is_not_retried(nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]) -> None:
    """401 from primary: one request only, no retry, and the backup serves."""
    primary, backup = fake_openai(always="401"), fake_openai()
    policy = policy_for(("primary", primary), ("backup", backup), retry={"attempts": 5, "initial_s": 0.01})
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "auth-1", "text": "how do I log in?"})
        await svc.collector.wait_for(results=1)
    [result] = svc.collector.results
    assert primary.count == 1
    assert result["model"] == "backup"
    assert not any(d["kind"] == "retry" for d in result["decisions"])
