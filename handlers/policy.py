"""The policy: which models exist, how events are routed to them, and how each route retries.

Read from a TOML file (``STANCHION_POLICY``, or a handler's own) or built in code. One file holds the models
every handler shares and, per handler (``[handlers.<name>]``), its routes, rules, deadline and breaker; a file
without handler sections applies to the one handler that reads it. Validated once, at start-up.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stanchion.handlers.errors import ConfigError

OutputMode = Literal["tool", "native", "prompted"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(_Strict):
    """Retry settings of a route. Backoff is exponential with jitter: initial_s * 2^n + U(0, jitter_s)."""

    attempts: int = Field(default=3, ge=1, le=20, description="Attempts per candidate, the first included.")
    initial_s: float = Field(default=0.5, ge=0)
    max_s: float = Field(default=8.0, ge=0)
    jitter_s: float = Field(default=0.5, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0, description="Cap on a provider's Retry-After.")


class BreakerConfig(_Strict):
    """Circuit-breaker settings (per model)."""

    consecutive_failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    window: int = Field(default=20, ge=1)
    min_calls: int = Field(default=10, ge=1)
    open_s: float = Field(default=30.0, ge=0)
    half_open_probes: int = Field(default=1, ge=1)
    probe_lease_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a half-open probe holds its slot (default: open_s); keep it above the attempt timeout.",
    )
    count_invalid_output: bool = Field(
        default=True,
        description="Also trip (per handler) on output still invalid after its retries, with the same thresholds.",
    )

    @model_validator(mode="after")
    def _window(self) -> BreakerConfig:
        if self.min_calls > self.window:
            raise ValueError(f"min_calls ({self.min_calls}) must not exceed window ({self.window})")
        return self


class TimeoutConfig(_Strict):
    attempt_s: float | None = Field(default=None, gt=0, description="Per attempt; default STANCHION_ATTEMPT_TIMEOUT_S.")


class ModelConfig(_Strict):
    """One model candidate."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(description='"provider:model", provider one of openai-chat, openai, anthropic, ollama.')
    base_url: str | None = None
    base_url_env: str | None = Field(
        default=None, description="Environment variable holding the base URL (wins over base_url when set)."
    )
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    output_mode: OutputMode = "tool"
    output_retries: int | None = Field(default=None, ge=0, le=10)
    breaker: BreakerConfig | None = None
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Calls at once to this model, per process (unset: unlimited); more wait within the deadline.",
    )
    price_input_per_mtok: float | None = Field(default=None, ge=0, description="USD per million input tokens.")
    price_output_per_mtok: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _provider(self) -> ModelConfig:
        provider, _, name = self.model.partition(":")
        if not name or provider not in PROVIDERS:
            raise ValueError(
                f"model {self.model!r} must be 'provider:model' with provider one of {', '.join(PROVIDERS)}"
            )
        return self

    @property
    def provider(self) -> str:
        return self.model.partition(":")[0]

    @property
    def model_name(self) -> str:
        return self.model.partition(":")[2]

    def resolved_base_url(self) -> str | None:
        """``base_url_env``'s value when that variable is set and not empty, else ``base_url``."""
        if self.base_url_env and (value := os.environ.get(self.base_url_env, "").strip()):
            return value
        return self.base_url


PROVIDERS = ("openai-chat", "openai", "anthropic", "ollama")


class RouteConfig(_Strict):
    models: list[str] = Field(default_factory=list)
    heuristic: bool = True
    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeout: TimeoutConfig = Field(default_factory=TimeoutConfig)


class RuleConfig(_Strict):
    """Send events to ``route`` when the handler's predicate named ``when`` holds (default: the route's name)."""

    route: str
    when: str | None = None

    @property
    def predicate(self) -> str:
        return self.when or self.route


class HandlerPolicy(_Strict):
    """One handler's section (``[handlers.<name>]``): overrides the file's top-level routes, rules and deadline."""

    routes: dict[str, RouteConfig] | None = None
    rules: list[RuleConfig] | None = None
    default_route: str | None = None
    deadline_s: float | None = Field(default=None, gt=0)
    breaker: BreakerConfig | None = None


class Policy(_Strict):
    """Models shared by every handler, and the routing of the one handler without a section of its own.

    Without ``routes``, one route ``default`` tries every model in the file's order, then the heuristic.
    """

    models: list[ModelConfig] = Field(default_factory=list)
    routes: dict[str, RouteConfig] | None = None
    rules: list[RuleConfig] | None = None
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    default_route: str = "default"
    deadline_s: float | None = Field(
        default=None, gt=0, description="Per-event deadline; default STANCHION_DEADLINE_S."
    )
    handlers: dict[str, HandlerPolicy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Policy:
        names = [m.name for m in self.models]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"duplicate model name(s): {', '.join(dupes)}")
        sections: list[tuple[str, HandlerPolicy | None]] = [("", None), *self.handlers.items()]
        for handler, _ in sections:
            resolved = self.section(handler or None)
            prefix = f"handlers.{handler}." if handler else ""
            for route_name, route in resolved.routes.items():
                if unknown := [m for m in route.models if m not in names]:
                    raise ValueError(f"{prefix}routes.{route_name}.models names unknown model(s): {', '.join(unknown)}")
            for rule in resolved.rules or []:
                if rule.route not in resolved.routes:
                    raise ValueError(f"{prefix}rules: unknown route {rule.route!r}")
            if resolved.default_route not in resolved.routes:
                raise ValueError(f"{prefix}default_route {resolved.default_route!r} is not in routes")
        return self

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    def section(self, handler: str | None) -> ResolvedPolicy:
        """What applies to ``handler``: its own section over the top level (the top level alone without one)."""
        own = self.handlers.get(handler) if handler is not None else None
        routes = (own.routes if own and own.routes is not None else None) or self.routes
        if routes is None:
            routes = {"default": RouteConfig(models=[m.name for m in self.models])}
        return ResolvedPolicy(
            models=tuple(self.models),
            routes=routes,
            rules=own.rules if own and own.rules is not None else self.rules,
            default_route=own.default_route if own and own.default_route else self.default_route,
            deadline_s=own.deadline_s if own and own.deadline_s else self.deadline_s,
            breaker=own.breaker if own and own.breaker else self.breaker,
        )


@dataclass(frozen=True)
class ResolvedPolicy:
    """The policy one handler runs with: the shared models, and its routes, rules, deadline and breaker."""

    models: tuple[ModelConfig, ...]
    routes: Mapping[str, RouteConfig]
    rules: list[RuleConfig] | None
    default_route: str
    deadline_s: float | None
    breaker: BreakerConfig

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


def load_policy(path: Path, *, setting: str = "STANCHION_POLICY", translate: Translate | None = None) -> Policy:
    """Read and validate a policy file; ``ConfigError`` names the file and the bad key.

    Args:
        path: The TOML file.
        setting: What the error message calls the file's setting.
        translate: Rewrites the parsed TOML before validation (a handler's older file format).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{setting}: {str(path)!r} is not valid TOML: {exc}") from None
    try:
        policy = Policy.model_validate(translate(data) if translate else data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{setting}: {str(path)!r}: {where}: {message}") from None
    if not policy.models:
        # Accepted, it would answer every event with the heuristic (or dead-letter it): surely not what was meant.
        raise ConfigError(f"{setting}: {str(path)!r}: defines no [[models]]")
    return policy


Translate = Callable[[dict[str, Any]], dict[str, Any]]
