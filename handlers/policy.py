"""The policy: which models exist, how events are routed to them, and how each route retries.

Read from a TOML file (``STANCHION_POLICY``) or built from the settings (the default policy: the
model-selection matrix of the classification use case). Validated once, at start-up.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.settings import Settings

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
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    output_mode: OutputMode = "tool"
    output_retries: int | None = Field(default=None, ge=0, le=10)
    breaker: BreakerConfig | None = None
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


PROVIDERS = ("openai-chat", "openai", "anthropic", "ollama")


class RouteConfig(_Strict):
    models: list[str] = Field(default_factory=list)
    heuristic: bool = True
    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeout: TimeoutConfig = Field(default_factory=TimeoutConfig)


class RuleConfig(_Strict):
    """Send events to ``route`` when ``kind`` is one of ``kinds`` or the text is at least ``min_text_length``."""

    route: str
    kinds: list[str] = Field(default_factory=list)
    min_text_length: int | None = Field(default=None, ge=1)


class Policy(_Strict):
    models: list[ModelConfig] = Field(default_factory=list)
    routes: dict[str, RouteConfig] = Field(default_factory=lambda: {"default": RouteConfig()})
    rules: list[RuleConfig] = Field(default_factory=list)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    default_route: str = "default"
    deadline_s: float | None = Field(
        default=None, gt=0, description="Per-event deadline; default STANCHION_DEADLINE_S."
    )

    @model_validator(mode="after")
    def _references(self) -> Policy:
        names = [m.name for m in self.models]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"duplicate model name(s): {', '.join(dupes)}")
        for route_name, route in self.routes.items():
            if unknown := [m for m in route.models if m not in names]:
                raise ValueError(f"routes.{route_name}.models names unknown model(s): {', '.join(unknown)}")
        for rule in self.rules:
            if rule.route not in self.routes:
                raise ValueError(f"rules: unknown route {rule.route!r}")
        if self.default_route not in self.routes:
            raise ValueError(f"default_route {self.default_route!r} is not in routes")
        return self

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; ``ConfigError`` names the file and the bad key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"STANCHION_POLICY: cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"STANCHION_POLICY: {str(path)!r} is not valid TOML: {exc}") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"STANCHION_POLICY: {str(path)!r}: {where}: {message}") from None


def default_policy(settings: Settings) -> Policy:
    """The model-selection matrix of the classification use case, for the keys that are present.

    production (an API key is set): ``fast`` (gpt-4o-mini) for simple events, ``strong`` (gpt-4o)
    first for complex ones, ``backup`` (Anthropic) behind both. local (no key): one Ollama model.
    Every route ends with the keyword heuristic.
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
    return Policy(
        models=models,
        routes={"default": RouteConfig(models=simple), "complex": RouteConfig(models=complex_)},
        rules=[RuleConfig(route="complex", kinds=["complex"], min_text_length=600)],
    )


def resolve_policy(settings: Settings) -> Policy:
    return load_policy(settings.policy) if settings.policy else default_policy(settings)
