"""The built-in classifier service: ``TaskEvent`` → ``TaskClassification``, declared on the public API.

``stanchion run`` (no argument) runs it; so does FastStream's own CLI: ``faststream run
stanchion.handlers.classify.app:app`` (an embedded nats-server when ``NATS_URL`` is unset) and
``faststream docs gen stanchion.handlers.classify.app:app``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker

from stanchion.contracts import TaskClassification, TaskEvent
from stanchion.handlers.api import Handler, Stanchion
from stanchion.handlers.classify.agent import build_agent, deadline, prompt
from stanchion.handlers.classify.heuristic import classify as heuristic
from stanchion.handlers.classify.policy import PREDICATES, Predicate, load_classifier_policy, resolve_policy
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.broker import create_broker
from stanchion.handlers.policy import Policy
from stanchion.handlers.runtime.results import ResultStore
from stanchion.handlers.settings import Settings
from stanchion.middleware import SYSTEM_CLOCK, Candidate, Clock, Terminal

NAME = "classify"

log = structlog.get_logger("stanchion.app")


def declare(
    reliable: Stanchion,
    *,
    policy: Policy | None = None,
    predicates: Mapping[str, Predicate] | None = None,
    candidates: Mapping[str, Candidate] | None = None,
    terminal: Terminal[TaskClassification] | None = None,
) -> Handler[TaskEvent, TaskClassification]:
    """The classifier as one handler of ``reliable``, on the subjects and streams of ``STANCHION_*``.

    Args:
        reliable: The app's ``Stanchion``.
        policy: Its policy (default: ``reliable``'s, else ``STANCHION_POLICY``, else the model-selection matrix);
            its ``[handlers.classify]`` section applies, or its top level.
        predicates: The routing predicates its policy's rules name (default: ``complex``).
    """
    settings = reliable.settings
    if policy is None:
        policy = reliable.policy
    if policy is None:
        policy, predicates = resolve_policy(settings)
    handler = reliable.agent(
        settings.input_subject,
        name=NAME,
        agent=build_agent(),
        output=settings.output_subject,
        dead_letters=settings.dlq_subject,
        input_stream=settings.input_stream,
        output_stream=settings.output_stream,
        dlq_stream=settings.dlq_stream,
        durable=settings.durable,
        heuristic=heuristic,
        deadline=deadline,
        rules=predicates if predicates is not None else PREDICATES,
        policy=policy,
        candidates=candidates,
        terminal=terminal,
        description="TaskEvents to classify. Anything that is not a valid TaskEvent becomes a dead letter.",
    )(prompt)
    handler.policy_loader = load_classifier_policy  # older files' [[rules]] with kinds / min_text_length
    return handler


def create_app(
    settings: Settings,
    policy: Policy | None = None,
    *,
    url: str | None = None,
    broker: NatsBroker | None = None,
    clock: Clock = SYSTEM_CLOCK,
    results: ResultStore | None = None,
    candidates: Mapping[str, Candidate] | None = None,
    terminal: Terminal[TaskClassification] | None = None,
    predicates: Mapping[str, Predicate] | None = None,
) -> tuple[FastStream, Handler[TaskEvent, TaskClassification]]:
    """The classifier's FastStream app on ``url`` (default ``settings.nats_url``), and its handler."""
    broker = broker or create_broker(settings, url)
    if policy is None:
        policy, predicates = resolve_policy(settings)  # STANCHION_POLICY as the classifier reads it (older rules too)
    reliable = Stanchion(broker, policy=policy, settings=settings, clock=clock, results=results)
    handler = declare(reliable, policy=policy, predicates=predicates, candidates=candidates, terminal=terminal)
    app = reliable.app(
        title="stanchion",
        description="Classifies TaskEvents with typed LLM agents behind a reliability stack.",
    )
    return app, handler


def _module_app() -> FastStream:
    """The app for ``faststream run stanchion.handlers.classify.app:app``: settings from the environment.

    ``NATS_URL`` unset: an embedded nats-server is started now, before the broker is built, and stopped after.
    """
    from stanchion.handlers.process import serve_module

    try:
        return serve_module(lambda settings: create_app(settings)[0])
    except ConfigError as exc:
        # One line and exit code 2, as `stanchion run` does (SystemExit with a message would exit 1).
        print(f"stanchion: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    # `faststream run ...classify.app:app` reads `app`: build it then, not whenever this module is imported.
    if name == "app":
        application = _module_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
