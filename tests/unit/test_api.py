"""The public API's declarations: names derived by one rule, every mistake a ConfigError naming it."""

from __future__ import annotations

import pytest
from faststream.nats import NatsBroker
from pydantic import BaseModel
from pydantic_ai import Agent

from stanchion import ConfigError, Policy, Stanchion
from stanchion.handlers.runtime.results import InMemoryResultStore
from stanchion.handlers.settings import Settings
from stanchion.middleware import Candidate


class Email(BaseModel):
    id: str
    body: str


class Refund(BaseModel):
    order_id: str


AGENT: Agent[None, Refund] = Agent(output_type=Refund, defer_model_check=True)
POLICY = Policy.model_validate({"models": [{"name": "m", "model": "openai-chat:m"}]})
CANDIDATES = {"m": Candidate("m")}


def reliable(policy: Policy = POLICY) -> Stanchion:
    settings = Settings(nats_url="nats://127.0.0.1:1")
    return Stanchion(NatsBroker("nats://127.0.0.1:1"), settings=settings, policy=policy, results=InMemoryResultStore())


def test_names_subjects_and_streams_are_derived_from_the_subject_and_the_name() -> None:
    """Without names given: the handler is named after its subject; its subjects, streams and durable after it."""
    app = reliable()

    @app.agent("emails.refund", agent=AGENT, candidates=CANDIDATES)
    def prompt(email: Email) -> str:
        return email.body

    settings = prompt.settings
    assert prompt.name == "emails-refund"
    assert (settings.input_subject, settings.output_subject, settings.dlq_subject) == (
        "emails.refund",
        "emails.refund.results",
        "dlq.emails.refund",
    )
    assert (settings.input_stream, settings.output_stream, settings.dlq_stream, settings.durable) == (
        "STANCHION_EMAILS_REFUND_EVENTS",
        "STANCHION_EMAILS_REFUND_RESULTS",
        "STANCHION_EMAILS_REFUND_DLQ",
        "stanchion-emails-refund",
    )
    assert prompt(Email(id="1", body="hi")) == "hi"


def test_limits_given_in_the_declaration_override_the_settings() -> None:
    app = reliable()

    @app.agent("a", agent=AGENT, candidates=CANDIDATES, max_in_flight=3, ack_wait_s=9.0, max_deliver=2)
    def prompt(email: Email) -> str:
        return email.body

    assert (prompt.settings.max_in_flight, prompt.settings.ack_wait_s, prompt.settings.max_deliver) == (3, 9.0, 2)
    assert app.settings.max_in_flight == 16  # the app's defaults are untouched


def test_a_policy_section_for_an_undeclared_handler_is_refused_when_the_app_is_built() -> None:
    app = reliable(
        Policy.model_validate({"models": [{"name": "m", "model": "openai-chat:m"}], "handlers": {"refnd": {}}})
    )

    @app.agent("emails.refund", name="refund", agent=AGENT, candidates=CANDIDATES)
    def prompt(email: Email) -> str:
        return email.body

    with pytest.raises(ConfigError, match=r"\[handlers\.refnd\] names no declared handler \(declared: refund\)"):
        app.app()


def test_a_rule_naming_an_undeclared_predicate_is_refused() -> None:
    policy = Policy.model_validate(
        {
            "models": [{"name": "m", "model": "openai-chat:m"}],
            "routes": {"default": {"models": ["m"]}, "big": {"models": ["m"]}},
            "rules": [{"route": "big", "when": "is_big"}],
        }
    )
    with pytest.raises(ConfigError, match="unknown predicate 'is_big'"):

        @reliable(policy).agent("a", agent=AGENT, candidates=CANDIDATES, rules={"large": lambda e: True})
        def prompt(email: Email) -> str:
            return email.body


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "letters, digits"),
        ({"agent": Agent(output_type=str, defer_model_check=True)}, "output_type must be a pydantic model"),
        ({"candidates": {}}, "no candidate for model"),
    ],
    ids=["name", "output", "candidates"],
)
def test_bad_declarations_fail_with_a_config_error(kwargs: dict[str, object], message: str) -> None:
    declaration: dict[str, object] = {"agent": AGENT, "candidates": CANDIDATES, **kwargs}
    with pytest.raises(ConfigError, match=message):

        @reliable().agent("a", **declaration)  # type: ignore[arg-type]
        def prompt(email: Email) -> str:
            return email.body


def test_a_handler_declared_twice_and_a_prompt_without_an_event_type_are_refused() -> None:
    app = reliable()

    def prompt(email: Email) -> str:
        return email.body

    app.agent("a", name="one", agent=AGENT, candidates=CANDIDATES)(prompt)
    with pytest.raises(ConfigError, match="declared twice"):
        app.agent("b", name="one", agent=AGENT, candidates=CANDIDATES)(prompt)
    with pytest.raises(ConfigError, match="annotate its parameter"):
        app.agent("c", agent=AGENT, candidates=CANDIDATES)(lambda email: "x")
