"""Invalid output against a real nats-server and the fake provider over HTTP: every request counted, every
validation error visible, and a candidate that keeps answering invalid output is taken out by its breaker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stanchion.contracts import DeadLetter, ResultEnvelope, TaskClassification
from stanchion.handlers.nats.embedded import EmbeddedNats
from tests.conftest import assert_each_accounted_once, policy_for, running_service
from tests.fake_openai import FakeOpenAI

PRICES = {"price_input_per_mtok": 3.0, "price_output_per_mtok": 15.0}


def priced(server: FakeOpenAI) -> float:
    """What the tokens this server answered cost at ``PRICES``."""
    return sum(i * 3.0 + o * 15.0 for i, o in server.tokens) / 1e6


async def test_two_invalid_answers_then_a_valid_one_are_three_requests_counted_and_two_decisions(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """output_retries = 2, invalid twice then valid: the envelope counts all three requests, their tokens and their
    cost, and its decisions hold both validation errors."""
    provider = fake_openai()
    provider.set(script=["invalid", "invalid"])
    policy = policy_for(("primary", provider), model_options={"primary": {"output_retries": 2, **PRICES}})
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "r-1", "text": "the export button crashes"})
        await svc.collector.wait_for(results=1)
    envelope = ResultEnvelope[TaskClassification].model_validate(svc.collector.results[0])
    assert provider.count == 3 and envelope.model == "primary" and not envelope.degraded
    assert envelope.usage.requests == 3
    assert envelope.usage.input_tokens == sum(i for i, _ in provider.tokens)
    assert envelope.usage.output_tokens == sum(o for _, o in provider.tokens)
    assert envelope.cost_usd == pytest.approx(priced(provider))
    retries = [d for d in envelope.decisions if d.kind == "output_retry"]
    assert [d.data["retry"] for d in retries] == [1, 2]
    for decision in retries:
        assert decision.data["errors"] == [{"field": "priority", "message": "Input should be less than or equal to 5"}]
        assert "priority: Input should be less than or equal to 5" in decision.detail


async def test_an_always_invalid_primary_costs_its_two_requests_and_the_backup_answers(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """output_retries = 1, primary always invalid, a healthy backup: three requests counted (two to primary), and
    the fallback's decision names the last validation error."""
    primary, backup = fake_openai(always="invalid"), fake_openai()
    options = {"primary": {"output_retries": 1, **PRICES}, "backup": {"output_retries": 1, **PRICES}}
    policy = policy_for(("primary", primary), ("backup", backup), model_options=options)
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "r-2", "text": "the export button crashes"})
        await svc.collector.wait_for(results=1)
    envelope = ResultEnvelope[TaskClassification].model_validate(svc.collector.results[0])
    assert (primary.count, backup.count) == (2, 1)
    assert envelope.model == "backup" and envelope.attempts == 2
    assert envelope.usage.requests == 3
    assert envelope.usage.input_tokens == sum(i for i, _ in primary.tokens + backup.tokens)
    assert envelope.cost_usd == pytest.approx(priced(primary) + priced(backup))
    [fell] = [d for d in envelope.decisions if d.kind == "fallback"]
    assert fell.model == "primary" and fell.data["failure"] == "permanent"
    assert "InvalidOutput" in fell.detail and "priority: Input should be less than or equal to 5" in fell.detail


async def test_a_dead_letter_of_invalid_output_carries_the_tokens_spent_and_the_last_validation_error(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """No backup, no heuristic: the dead letter says what was spent and why the output was refused."""
    primary = fake_openai(always="invalid")
    policy = policy_for(
        ("primary", primary), heuristic=False, model_options={"primary": {"output_retries": 1, **PRICES}}
    )
    async with running_service(nats_server.url, policy) as svc:
        await svc.publish({"id": "r-3", "text": "the export button crashes"})
        await svc.collector.wait_for(dead=1)
    dead = DeadLetter.model_validate(svc.collector.dead[0])
    assert dead.error_type == "failed" and primary.count == 2
    assert dead.usage.requests == 2
    assert (dead.usage.input_tokens, dead.usage.output_tokens) == tuple(map(sum, zip(*primary.tokens, strict=True)))
    assert dead.cost_usd == pytest.approx(priced(primary))
    [error] = dead.errors
    assert error.startswith("InvalidOutput: ") and "priority: Input should be less than or equal to 5" in error


async def test_a_candidate_answering_invalid_output_is_taken_out_by_its_quality_breaker(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI]
) -> None:
    """output_retries = 1, primary always invalid, healthy backup, 2 in flight, 50 events, breaker defaults (5 in a
    row, open 30 s): all 50 answered by the backup, and primary hears at most (5 + 2) x 2 requests (plus one
    half-open probe per 30 s, which a run this short does not reach)."""
    primary, backup = fake_openai(always="invalid"), fake_openai()
    options = {"primary": {"output_retries": 1}, "backup": {"output_retries": 1}}
    policy = policy_for(("primary", primary), ("backup", backup), model_options=options)
    ids = [f"q-{i}" for i in range(50)]
    async with running_service(nats_server.url, policy, max_in_flight=2) as svc:
        for event_id in ids:
            await svc.publish({"id": event_id, "text": f"the export button crashes ({event_id})"})
        await svc.collector.wait_for(results=50, timeout=60)
        assert svc.service.quality_breaker is not None and svc.service.breaker is not None
        assert (await svc.service.quality_breaker.state("primary")).value == "open"
        assert (await svc.service.breaker.state("primary")).value == "closed"  # the provider itself is healthy
    assert_each_accounted_once(ids, svc.collector.results, svc.collector.dead)
    assert all(r["model"] == "backup" and not r["degraded"] for r in svc.collector.results)
    elapsed = primary.requests[-1].at - primary.requests[0].at
    assert primary.count <= (5 + 2) * 2 + 1 + int(elapsed // 30)
