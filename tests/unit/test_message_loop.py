"""MessageLoop: one delivery from start to finish — publish then ack, term, or nak — without NATS.

A fake message records what the loop did to it; the publishers are plain functions that may fail.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from faststream.nats import NatsBroker

from stanchion.contracts import TaskClassification, TaskEvent
from stanchion.handlers.api import Stanchion
from stanchion.handlers.classify.app import declare
from stanchion.handlers.nats.loop import MessageLoop
from stanchion.handlers.policy import Policy
from stanchion.handlers.runtime.handler import HandlerRuntime
from stanchion.handlers.runtime.results import InMemoryResultStore
from stanchion.handlers.settings import Settings
from stanchion.middleware import Call, Candidate, FakeClock
from tests.unit.fakes import server_error

ANSWER = TaskClassification(category="bug", priority=4, confidence=0.9, summary="it crashes")
POLICY = Policy.model_validate(
    {
        "models": [{"name": "primary", "model": "openai-chat:m"}],
        "routes": {"default": {"models": ["primary"], "heuristic": False, "retry": {"attempts": 1}}},
    }
)


@dataclass
class FakeMessage:
    """What the loop may do to a JetStream message, recorded in order."""

    done: list[tuple[str, float | None]] = field(default_factory=list)
    headers: Mapping[str, Any] = field(default_factory=dict)
    raw_message: Any = field(
        default_factory=lambda: SimpleNamespace(metadata=SimpleNamespace(sequence=SimpleNamespace(stream=7)))
    )

    async def ack(self) -> None:
        self.done.append(("ack", None))

    async def nack(self, delay: float | None = None) -> None:
        self.done.append(("nack", delay))

    async def reject(self) -> None:
        self.done.append(("term", None))

    async def in_progress(self) -> None:
        self.done.append(("in_progress", None))


class Answering:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, call: Call) -> TaskClassification:
        self.calls += 1
        call.attempts += 1
        if self.calls <= self.failures:
            raise server_error(503)
        return ANSWER


@dataclass
class Published:
    """A publisher that fails its first ``failures`` publishes, and records the rest."""

    failures: int = 0
    bodies: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)

    async def __call__(self, body: bytes, headers: Mapping[str, str]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("no stream response")
        self.bodies.append((body, dict(headers)))


def runtime(terminal: Answering, clock: FakeClock) -> HandlerRuntime[TaskEvent, TaskClassification]:
    settings = Settings(nats_url="nats://127.0.0.1:1", nak_backoff_s=(2.0, 10.0), max_deliver=3)
    reliable = Stanchion(
        NatsBroker("nats://127.0.0.1:1"), settings=settings, clock=clock, results=InMemoryResultStore()
    )
    return declare(reliable, policy=POLICY, candidates={"primary": Candidate("primary")}, terminal=terminal).runtime


def loop(terminal: Answering, results: Published, dead: Published, clock: FakeClock) -> MessageLoop:
    return MessageLoop(runtime(terminal, clock), results, dead, ack_wait_s=30.0, max_pause_s=5.0, clock=clock)


EVENT = json.dumps({"id": "e-1", "text": "the app crashes"}).encode()


async def test_an_answer_is_published_with_its_id_then_acked() -> None:
    results, dead, msg = Published(), Published(), FakeMessage()
    await loop(Answering(), results, dead, FakeClock())(msg, EVENT, 1, "tasks.classify")
    [(body, headers)] = results.bodies
    assert json.loads(body)["event_id"] == "e-1" and headers["Nats-Msg-Id"] == "e-1"
    assert msg.done == [("ack", None)] and dead.bodies == []


async def test_poison_is_dead_lettered_then_termed() -> None:
    results, dead, msg = Published(), Published(), FakeMessage()
    await loop(Answering(), results, dead, FakeClock())(msg, b"{oops", 1, "tasks.classify")
    [(body, headers)] = dead.bodies
    assert json.loads(body)["error_type"] == "poison.json" and headers["Nats-Msg-Id"] == "dead:unknown:7"
    assert msg.done == [("term", None)] and results.bodies == []


async def test_a_transient_failure_is_nacked_with_the_backoff_of_its_delivery() -> None:
    msg = FakeMessage()
    await loop(Answering(failures=9), Published(), Published(), FakeClock())(msg, EVENT, 2, "tasks.classify")
    assert msg.done == [("nack", 10.0)]


async def test_a_publish_jetstream_did_not_confirm_is_nacked_with_the_same_backoff() -> None:
    """The handler itself failed (no confirmation): nak with the redelivery policy's delay, nothing acked."""
    msg = FakeMessage()
    await loop(Answering(), Published(failures=1), Published(), FakeClock())(msg, EVENT, 1, "tasks.classify")
    assert msg.done == [("nack", 2.0)]


async def test_on_the_last_delivery_publishing_is_retried_on_the_clock_until_it_lands() -> None:
    """Last delivery: a failing publish is retried (sleeping on the injected clock), then acked."""
    clock, results, msg = FakeClock(), Published(failures=2), FakeMessage()
    await loop(Answering(), results, Published(), clock)(msg, EVENT, 3, "tasks.classify")
    assert len(results.bodies) == 1 and msg.done == [("ack", None)]
    assert clock.now() >= 0.5 + 1.0  # two waits, 0.5 s and 1 s, slept on the fake clock


async def test_an_answer_that_cannot_be_published_on_the_last_delivery_stays_unacked() -> None:
    """An answer the output stream never confirms is neither acked nor dead-lettered: it stays for redelivery."""
    dead, msg = Published(), FakeMessage()
    await loop(Answering(), Published(failures=99), dead, FakeClock())(msg, EVENT, 3, "tasks.classify")
    # The answer could not be published: its outcome stays unpublished and the message unacked for redelivery.
    assert msg.done == [] and dead.bodies == []


class BrokenStore(InMemoryResultStore):
    async def get(self, key: str) -> None:
        raise ConnectionError("result bucket unreachable")


async def test_a_handler_that_fails_on_the_last_delivery_dead_letters_the_event_as_internal() -> None:
    """The handler itself failing (here its result store) naks; on the last delivery the event becomes an
    ``internal`` dead letter rather than being lost."""
    clock = FakeClock()
    handler_loop = loop(Answering(), Published(), dead := Published(), clock)
    handler_loop.runtime.results = BrokenStore()
    early, last = FakeMessage(), FakeMessage()
    await handler_loop(early, EVENT, 1, "tasks.classify")
    await handler_loop(last, EVENT, 3, "tasks.classify")
    assert early.done == [("nack", 2.0)]
    [(body, _)] = dead.bodies
    letter = json.loads(body)
    assert (letter["error_type"], letter["event_id"], letter["handler"]) == ("internal", "e-1", "classify")
    assert "result bucket unreachable" in letter["errors"][0]
    assert last.done == [("term", None)]
