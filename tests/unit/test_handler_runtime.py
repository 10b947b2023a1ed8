"""HandlerRuntime: bytes in, one outcome out — validation, the result store, naks, pauses, dead letters.

Built the way an app builds it (``Stanchion`` on a broker that never connects, the classifier declared on it),
with a scripted terminal and a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from faststream.nats import NatsBroker
from pydantic import BaseModel, Field
from pydantic_ai import Agent

from stanchion.contracts import TaskClassification, TaskEvent, Usage
from stanchion.handlers.api import Stanchion
from stanchion.handlers.classify.app import declare
from stanchion.handlers.policy import Policy
from stanchion.handlers.runtime.handler import HandlerRuntime
from stanchion.handlers.runtime.outcome import Answered, DeadLettered, Redeliver
from stanchion.handlers.runtime.redact import Redactor
from stanchion.handlers.runtime.results import InMemoryResultStore
from stanchion.handlers.settings import Settings
from stanchion.middleware import Call, Candidate, FakeClock, Terminal
from tests.unit.fakes import rate_limited, server_error, unauthorized

ANSWER = TaskClassification(category="bug", priority=4, confidence=0.9, summary="it crashes")
POLICY = Policy.model_validate(
    {
        "models": [{"name": "primary", "model": "openai-chat:m"}],
        "routes": {"default": {"models": ["primary"], "heuristic": False, "retry": {"attempts": 3}}},
        "breaker": {"consecutive_failures": 2, "open_s": 30},
    }
)


class TerminalStub:
    """A terminal that fails ``failures`` times with a 503, then answers; it counts its calls."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self, call: Call) -> TaskClassification:
        self.calls += 1
        call.attempts += 1
        if self.calls <= self.failures:
            raise server_error(503)
        return ANSWER


Runtime = HandlerRuntime[TaskEvent, TaskClassification]


def runtime(policy: Policy, terminal: Terminal[TaskClassification], clock: FakeClock, **settings: Any) -> Runtime:
    """The classifier's runtime as an app declares it, with ``terminal`` for the agent and no NATS connection."""
    config = Settings(**{"nats_url": "nats://127.0.0.1:1", "nak_backoff_s": (2.0, 10.0), "max_deliver": 3, **settings})
    reliable = Stanchion(NatsBroker("nats://127.0.0.1:1"), settings=config, clock=clock, results=InMemoryResultStore())
    candidates = {m.name: Candidate(m.name) for m in policy.models}
    return declare(reliable, policy=policy, candidates=candidates, terminal=terminal).runtime


def make_service(terminal: TerminalStub, clock: FakeClock, **settings: Any) -> Runtime:
    return runtime(POLICY, terminal, clock, **settings)


def event(event_id: str = "e-1") -> bytes:
    return json.dumps({"id": event_id, "text": "the app crashes"}).encode()


async def test_an_answered_event_is_stored_and_never_sent_to_the_model_again() -> None:
    """The second time an event id comes, the stored result answers it without calling the stack."""
    terminal = TerminalStub()
    service = make_service(terminal, FakeClock())
    first = await service.handle(event(), subject="tasks.classify")
    again = await service.handle(event(), subject="tasks.classify", delivery=2)
    assert isinstance(first, Answered) and not first.stored
    assert isinstance(again, Answered) and again.stored and not again.published
    assert again.envelope.result == ANSWER
    assert terminal.calls == 1


async def test_a_published_result_is_only_acked_on_redelivery() -> None:
    """Once the service recorded the publication, a redelivery says there is nothing left to publish."""
    service = make_service(TerminalStub(), FakeClock())
    first = await service.handle(event(), subject="tasks.classify")
    assert isinstance(first, Answered)
    await service.published(first.envelope)
    again = await service.handle(event(), subject="tasks.classify", delivery=2)
    assert isinstance(again, Answered) and again.published


async def test_transient_failure_naks_with_the_backoff_of_its_delivery() -> None:
    """Every candidate failed transiently and deliveries remain: nak with the delay for this delivery."""
    clock = FakeClock()
    terminal = TerminalStub(failures=100)
    service = make_service(terminal, clock)
    outcome = await service.handle(event(), subject="tasks.classify", delivery=2)
    assert isinstance(outcome, Redeliver)
    assert outcome.delay_s == 10.0
    assert terminal.calls == 1  # a redelivery is not retried in-process


async def test_the_last_delivery_is_dead_lettered_as_exhausted_with_every_cause() -> None:
    """On the last delivery a transient failure becomes an `exhausted` dead letter keeping its causes."""
    service = make_service(TerminalStub(failures=100), FakeClock())
    outcome = await service.handle(event("e-9"), subject="tasks.classify", delivery=3)
    assert isinstance(outcome, DeadLettered)
    dead = outcome.dead
    assert (dead.error_type, dead.event_id, dead.deliveries, dead.models_tried) == ("exhausted", "e-9", 3, ["primary"])
    assert dead.errors and "503" in dead.errors[0]
    assert json.loads(dead.payload)["id"] == "e-9"


async def test_open_circuits_ask_for_a_pause_as_long_as_the_breaker_stays_open() -> None:
    """When the failure left every candidate's circuit open, the outcome carries the pause until it may close."""
    clock = FakeClock()
    service = make_service(TerminalStub(failures=100), clock)
    outcome = await service.handle(event(), subject="tasks.classify")  # 2 failures trip the breaker
    assert isinstance(outcome, Redeliver)
    assert outcome.pause_s is not None
    assert 25.0 < outcome.pause_s <= 30.0  # open_s, less the backoff slept since it opened
    assert outcome.delay_s >= outcome.pause_s


async def test_retry_false_makes_one_attempt() -> None:
    """Handling again after a pause (retry=False) makes one attempt per candidate, not a new retry budget."""
    terminal = TerminalStub(failures=1)
    service = make_service(terminal, FakeClock())
    outcome = await service.handle(event(), subject="tasks.classify", retry=False)
    assert isinstance(outcome, Redeliver)
    assert terminal.calls == 1


async def test_a_payload_quoting_a_secret_is_masked_and_flagged() -> None:
    """A poison payload containing the API key is stored masked and marked as not replayable."""
    service = make_service(TerminalStub(), FakeClock(), openai_api_key="sk-unit-secret-123456")
    outcome = await service.handle(b'{"id": 1, "text": "key sk-unit-secret-123456"}', subject="tasks.classify")
    assert isinstance(outcome, DeadLettered)
    assert "sk-unit-secret-123456" not in outcome.dead.model_dump_json()
    assert outcome.dead.payload_redacted


class ScriptedTerminal:
    """Fails each candidate with its own error, every time."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        self.errors = errors

    async def __call__(self, call: Call) -> TaskClassification:
        call.attempts += 1
        assert call.candidate is not None
        raise self.errors[call.candidate.name]


def two_candidate_service(errors: dict[str, Exception]) -> Runtime:
    policy = Policy.model_validate(
        {
            "models": [{"name": "primary", "model": "openai-chat:m"}, {"name": "backup", "model": "openai-chat:n"}],
            "routes": {"default": {"models": ["primary", "backup"], "heuristic": False, "retry": {"attempts": 1}}},
        }
    )
    return runtime(policy, ScriptedTerminal(errors), FakeClock(), nak_backoff_s=(2.0,))


async def test_a_pause_needs_every_candidate_to_say_how_long_to_wait() -> None:
    """One candidate asking to wait beside another's one-off 5xx is a plain nak, not a pause of all work."""
    service = two_candidate_service({"primary": rate_limited(retry_after=5.0), "backup": server_error(500)})
    outcome = await service.handle(event(), subject="tasks.classify")
    assert isinstance(outcome, Redeliver)
    assert outcome.pause_s is None


async def test_every_candidate_asking_to_wait_pauses_for_the_shortest_wait() -> None:
    """When every candidate answered 429 with Retry-After, the pause is the shortest of their waits."""
    service = two_candidate_service({"primary": rate_limited(retry_after=5.0), "backup": rate_limited(retry_after=3.0)})
    outcome = await service.handle(event(), subject="tasks.classify")
    assert isinstance(outcome, Redeliver)
    assert outcome.pause_s == 3.0
    assert outcome.delay_s == 3.0


def test_a_secret_cut_off_at_the_end_of_a_text_is_masked_too() -> None:
    """A known secret truncated by an upstream length limit leaves no recognisable prefix behind."""
    redact = Redactor(["nats-token-0123456789"])
    assert redact("error: token=nats-token-01") == "error: token=***"
    assert redact("whole nats-token-0123456789 here") == "whole *** here"


def test_the_redactor_masks_key_shapes_and_leaves_other_text_as_it_is() -> None:
    """Texts without a secret's head or a key shape pass unchanged; key shapes are masked with no secret known."""
    redact = Redactor(["hunter2-password"])
    assert redact("openai-chat:gpt-4o-mini answered in 12 ms") == "openai-chat:gpt-4o-mini answered in 12 ms"
    assert redact("auth: Bearer abcdefgh12345678") == "auth: ***"
    assert redact("key sk-proj-abcdefgh1234 leaked") == "key *** leaked"
    assert redact("sk-ant-abcdefgh1234") == "***"
    assert redact("pw=hunter2-password, hunting") == "pw=***, hunting"
    assert redact("pw=hunter2-pass") == "pw=***"


async def test_a_secret_in_the_answer_is_masked_in_the_envelope_and_the_stored_result() -> None:
    """An answer quoting a known secret is published and stored with the secret masked."""

    class Quoting(TerminalStub):
        async def __call__(self, call: Call) -> TaskClassification:
            call.attempts += 1
            return ANSWER.model_copy(update={"summary": "key sk-unit-secret-123456 leaked"})

    service = runtime(POLICY, Quoting(), FakeClock(), openai_api_key="sk-unit-secret-123456")
    outcome = await service.handle(event(), subject="tasks.classify")
    assert isinstance(outcome, Answered)
    assert outcome.envelope.result.summary == "key *** leaked"
    stored = await service.results.get(service.key("e-1"))
    assert stored is not None and b"sk-unit-secret" not in stored.envelope and b"sk-unit-secret" not in outcome.body


class Token(BaseModel):
    value: str = Field(pattern=r"^sk-")


async def test_an_answer_that_masked_is_no_longer_valid_is_dead_lettered_never_published() -> None:
    """When masking the secret makes the answer invalid for its type, the event is a ``secret_in_output`` dead
    letter, and the secret is in no part of it."""
    secret = "sk-unit-secret-654321"

    async def leaking(call: Call) -> Token:
        call.attempts += 1
        return Token(value=secret)

    config = Settings(nats_url="nats://127.0.0.1:1", openai_api_key=secret)
    reliable = Stanchion(
        NatsBroker("nats://127.0.0.1:1"), settings=config, policy=POLICY, results=InMemoryResultStore()
    )
    agent: Agent[None, Token] = Agent(output_type=Token, defer_model_check=True)

    @reliable.agent("tokens", agent=agent, candidates={"primary": Candidate("primary")}, terminal=leaking)
    def ask(email: TaskEvent) -> str:
        return email.text

    outcome = await ask.runtime.handle(event(), subject="tokens")
    assert isinstance(outcome, DeadLettered)
    assert outcome.dead.error_type == "secret_in_output" and "not a valid Token" in outcome.dead.reason
    assert secret not in outcome.dead.model_dump_json()
    assert await ask.runtime.results.get(ask.runtime.key("e-1")) is None


async def test_a_dead_letter_carries_the_tokens_and_cost_spent_on_the_event() -> None:
    """Every attempt was paid for: a dead letter says how many tokens (and dollars) the event cost before it failed."""

    class Paid(TerminalStub):
        async def __call__(self, call: Call) -> TaskClassification:
            call.attempts += 1
            call.add_usage(Usage(input_tokens=120, output_tokens=30, requests=2), 0.0004)
            raise unauthorized()

    outcome = await make_service(Paid(), FakeClock()).handle(event(), subject="tasks.classify")
    assert isinstance(outcome, DeadLettered) and outcome.dead.error_type == "failed"
    assert outcome.dead.usage == Usage(input_tokens=120, output_tokens=30, requests=2)
    assert outcome.dead.cost_usd == pytest.approx(0.0004)
