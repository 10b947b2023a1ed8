"""The classifier's policy: the model-selection matrix as its default, its routing predicates, and the
``[[rules]]`` of older policy files (``kinds``, ``min_text_length``) read as predicates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stanchion.contracts import TaskEvent
from stanchion.handlers.policy import ModelConfig, Policy, RouteConfig, RuleConfig, load_policy
from stanchion.handlers.settings import Settings

COMPLEX_TEXT_LENGTH = 600

Predicate = Callable[[Any], bool | str | None]


def kind_or_length(kinds: frozenset[str], min_text_length: int | None) -> Predicate:
    """True (with the reason) when the task's kind is one of ``kinds`` or its text is at least that long."""

    def matches(event: TaskEvent) -> str | None:
        if kinds and event.kind in kinds:
            return f"kind is {event.kind}"
        if min_text_length is not None and len(event.text) >= min_text_length:
            return f"text length {len(event.text)} >= {min_text_length}"
        return None

    return matches


PREDICATES: dict[str, Predicate] = {"complex": kind_or_length(frozenset({"complex"}), COMPLEX_TEXT_LENGTH)}
"""The classifier's routing predicates: ``complex`` sends complex or long tasks to the route of that name."""


def translate(data: dict[str, Any], predicates: dict[str, Predicate]) -> dict[str, Any]:
    """Older files' ``[[rules]]`` (``route``, ``kinds``, ``min_text_length``) as rules naming new predicates."""
    rules = data.get("rules")
    if not isinstance(rules, list):
        return data
    translated: list[Any] = []
    for index, rule in enumerate(rules):
        if isinstance(rule, dict) and ("kinds" in rule or "min_text_length" in rule):
            rule = dict(rule)
            kinds, length = rule.pop("kinds", []), rule.pop("min_text_length", None)
            name = f"rules[{index}]"
            predicates[name] = kind_or_length(frozenset(kinds or []), length)
            rule["when"] = name
        translated.append(rule)
    return {**data, "rules": translated}


def load_classifier_policy(path: Path, setting: str = "STANCHION_POLICY") -> tuple[Policy, dict[str, Predicate]]:
    """A policy file for the classifier, and the predicates its rules name (older rules included)."""
    predicates = dict(PREDICATES)
    policy = load_policy(path, setting=setting, translate=lambda data: translate(data, predicates))
    return policy, predicates


def default_policy(settings: Settings) -> Policy:
    """The model-selection matrix of the classification use case, for the keys that are present.

    production (an API key is set): ``fast`` (gpt-4o-mini) for simple events, ``strong`` (gpt-4o)
    first for complex ones, ``backup`` (Anthropic) behind both. local (no key): one Ollama model.
    Every route ends with the keyword heuristic. ``STANCHION_OUTPUT_MODE`` sets every model's output mode
    (default: ``tool`` for the cloud models, ``native`` for the local one).
    """
    profile = settings.profile
    if profile == "auto":
        profile = "production" if (settings.openai_api_key or settings.anthropic_api_key) else "local"
    models: list[ModelConfig] = []
    if profile == "production":
        if settings.openai_api_key:
            models += [
                ModelConfig(
                    name="fast",
                    model="openai-chat:gpt-4o-mini",
                    base_url=settings.openai_base_url,
                    api_key_env="OPENAI_API_KEY",
                ),
                ModelConfig(
                    name="strong",
                    model="openai-chat:gpt-4o",
                    base_url=settings.openai_base_url,
                    api_key_env="OPENAI_API_KEY",
                ),
            ]
        if settings.anthropic_api_key:
            models.append(
                ModelConfig(name="backup", model="anthropic:claude-3-5-haiku-latest", api_key_env="ANTHROPIC_API_KEY")
            )
    if not models:
        models.append(
            ModelConfig(name="local", model="ollama:llama3.2", base_url=settings.ollama_base_url, output_mode="native")
        )
    names = [m.name for m in models]
    simple = [n for n in ("fast", "backup", "local") if n in names]
    complex_ = [n for n in ("strong", "backup", "fast", "local") if n in names]
    if settings.output_mode is not None:
        models = [m.model_copy(update={"output_mode": settings.output_mode}) for m in models]
    return Policy(
        models=models,
        routes={"default": RouteConfig(models=simple), "complex": RouteConfig(models=complex_)},
        rules=[RuleConfig(route="complex", when="complex")],
    )


def resolve_policy(settings: Settings) -> tuple[Policy, dict[str, Predicate]]:
    """``STANCHION_POLICY`` when set, else the default policy; and the predicates its rules name."""
    if settings.policy:
        return load_classifier_policy(settings.policy)
    return default_policy(settings), dict(PREDICATES)
