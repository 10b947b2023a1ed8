"""A per-model concurrency limit against a provider with one slot, over real HTTP and a real nats-server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import assert_each_accounted_once, policy_for, running_service
from tests.fake_openai import FakeOpenAI


async def run(nats_url: str, server: FakeOpenAI, max_concurrency: int | None) -> list[dict[str, Any]]:
    """16 events at once to a one-slot server answering in 300 ms (attempt timeout 2 s, deadline 60 s)."""
    options = {"primary": {"max_concurrency": max_concurrency}} if max_concurrency else {}
    policy = policy_for(("primary", server), model_options=options, retry={"attempts": 2, "initial_s": 0.05})
    ids = [f"b{max_concurrency}-{i}" for i in range(16)]
    async with running_service(nats_url, policy, max_in_flight=16, attempt_timeout_s=2.0, deadline_s=60.0) as svc:
        for event_id in ids:
            await svc.publish({"id": event_id, "text": f"the export button crashes ({event_id})"})
        await svc.collector.wait_for(results=16, timeout=90)
    assert_each_accounted_once(ids, svc.collector.results, svc.collector.dead)
    return svc.collector.results


def timeouts(results: list[dict[str, Any]]) -> int:
    return sum(1 for r in results for d in r["decisions"] if d["kind"] == "timeout")


async def test_a_limit_of_one_slot_keeps_the_attempt_timeout_for_the_model_and_without_it_the_queue_times_out(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """With max_concurrency = 1 all 16 are answered by the model with no attempt timeout, each wait a decision;
    without it, the same run has attempt timeouts (the server's queue counted against the model)."""
    limited = await run(nats_server.url, fake_openai(latency_s=0.3, slots=1), max_concurrency=1)
    assert timeouts(limited) == 0
    assert all(r["model"] == "primary" and not r["degraded"] for r in limited)
    waits = [d for r in limited for d in r["decisions"] if d["kind"] == "bulkhead"]
    assert len(waits) >= 14 and all(d["data"]["limit"] == 1 and d["data"]["waited_s"] > 0 for d in waits)

    unlimited = await run(nats_server.url, fake_openai(latency_s=0.3, slots=1), max_concurrency=None)
    assert timeouts(unlimited) > 0
