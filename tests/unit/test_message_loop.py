"""MessageLoop: one delivery from start to finish — publish then ack, term, or nak — without NATS.

A fake message records what the loop did to it; the publishers are plain functions that may fail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from faststream.nats import NatsBroker
from nats.js.errors import NoStreamResponseError

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


async def test_a_publish_the_stream_did_not_confirm_is_tried_again_and_spends_no_delivery() -> None:
    """The output stream not confirming (gone, or the server away): the message is held and the publish tried
    again on the clock until it lands, then acked — never nak'ed, which would spend a delivery."""
    clock, results, msg = FakeClock(), Published(failures=3), FakeMessage()
    await loop(Answering(), results, Published(), clock)(msg, EVENT, 1, "tasks.classify")
    assert len(results.bodies) == 1 and msg.done == [("ack", None)]
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.6])


async def test_a_missing_output_stream_is_recreated_before_the_publish_is_tried_again() -> None:
    """``NoStreamResponseError`` (nobody stores the subject): the loop asks for the stream to be recreated."""
    repaired: list[str] = []

    class Gone(Published):
        async def __call__(self, body: bytes, headers: Mapping[str, str]) -> None:
            if not repaired:
                raise NoStreamResponseError
            await super().__call__(body, headers)

    async def repair(kind: str) -> None:
        repaired.append(kind)

    handler_loop = loop(Answering(), results := Gone(), Published(), FakeClock())
    handler_loop.repair = repair
    msg = FakeMessage()
    await handler_loop(msg, EVENT, 1, "tasks.classify")
    assert repaired == ["results"] and len(results.bodies) == 1 and msg.done == [("ack", None)]


async def test_a_publish_that_never_lands_is_handed_back_at_shutdown() -> None:
    """Held for a publish that never succeeds, the message is nak'ed when shutdown begins — not acked, not lost."""
    clock, msg = FakeClock(), FakeMessage()
    handler_loop = loop(Answering(), Published(failures=10**9), Published(), clock)
    task = asyncio.create_task(handler_loop(msg, EVENT, 3, "tasks.classify"))
    while len(clock.sleeps) < 5:
        await asyncio.sleep(0)
    handler_loop.stop(grace_s=0.0)
    await asyncio.wait_for(task, 5)
    assert ("ack", None) not in msg.done and msg.done[-1] == ("nack", 2.0)


async def test_at_shutdown_waiting_messages_are_handed_back_at_once_and_work_in_flight_before_the_grace_ends() -> None:
    """With every slot busy, a waiting message is nak'ed as soon as shutdown begins; the one in flight is
    cancelled and nak'ed shortly before the grace period ends; nothing is left unacked and unanswered."""
    release = asyncio.Event()

    class Slow(Answering):
        async def __call__(self, call: Call) -> TaskClassification:
            await release.wait()
            return await super().__call__(call)

    handler_loop = MessageLoop(
        runtime(Slow(), FakeClock()), Published(), Published(), ack_wait_s=30.0, max_pause_s=5.0, max_in_flight=1
    )
    busy, waiting = FakeMessage(), FakeMessage()
    first = asyncio.create_task(handler_loop(busy, EVENT, 1, "tasks.classify"))
    second = asyncio.create_task(handler_loop(waiting, json.dumps({"id": "e-2", "text": "x"}).encode(), 1, "t"))
    await asyncio.sleep(0.05)
    assert busy.done == [] and waiting.done == []
    handler_loop.stop(grace_s=0.5)
    await asyncio.wait_for(second, 1)
    assert waiting.done == [("nack", 2.0)]
    await asyncio.wait_for(first, 2)
    assert busy.done == [("nack", 2.0)]
    assert handler_loop.runtime.stats.models["primary"].errors == {"cancelled": 1}


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
