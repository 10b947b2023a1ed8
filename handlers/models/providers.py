"""Model candidates from the policy: pydantic-ai models on the providers' SDK clients, one per candidate."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from anthropic import AsyncAnthropic
from anthropic import DefaultAioHttpClient as AnthropicAioHttpClient
from openai import AsyncOpenAI, DefaultAioHttpClient
from pydantic_ai import NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai.models import Model
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.output import OutputSpec
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

from stanchion.contracts import Usage
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.policy import ModelConfig, OutputMode
from stanchion.middleware import Candidate

OutputT = TypeVar("OutputT")


@dataclass(frozen=True)
class ModelTarget(Generic[OutputT]):
    """What the terminal needs to call one candidate: the model, how the output is asked for, prices."""

    model: Model
    output: OutputSpec[OutputT]
    output_retries: int
    price_input_per_mtok: float | None = None
    price_output_per_mtok: float | None = None

    def cost(self, usage: Usage, reported: float | None) -> float | None:
        """The policy's prices when set, else what genai-prices reported (``None`` when unknown)."""
        if self.price_input_per_mtok is None and self.price_output_per_mtok is None:
            return reported
        return (
            usage.input_tokens * (self.price_input_per_mtok or 0.0)
            + usage.output_tokens * (self.price_output_per_mtok or 0.0)
        ) / 1_000_000


def output_spec(output_type: type[OutputT], mode: OutputMode) -> OutputSpec[OutputT]:
    """Tool calls (default), the provider's native JSON schema, or a schema in the prompt."""
    if mode == "native":
        return NativeOutput(output_type)
    if mode == "prompted":
        return PromptedOutput(output_type)
    return ToolOutput(output_type)


def build_model(config: ModelConfig, *, attempt_timeout_s: float) -> Model:
    """A pydantic-ai model for one candidate, with the SDK's own retries off (our Retry is the only one)."""
    api_key = _api_key(config)
    # max_tokens: structured answers are short, and Anthropic streams requests allowed more than ~21k tokens.
    # No max_retries here: the clients below are built with max_retries=0 already, and a max_retries in the model
    # settings makes pydantic-ai copy the SDK client for every request (a visible share of the per-event CPU).
    # The SDKs' aiohttp transport rather than their default httpx pool: about a third less CPU per request, and
    # the httpx pool's cost grows with the requests in flight (bench/RESULTS.md). Proxy variables still apply.
    settings = ModelSettings(timeout=attempt_timeout_s, max_tokens=1024)
    base_url = config.resolved_base_url()
    if config.provider == "anthropic":
        anthropic = AsyncAnthropic(
            api_key=api_key or "api-key-not-set",
            base_url=base_url,
            max_retries=0,
            timeout=attempt_timeout_s,
            http_client=AnthropicAioHttpClient(timeout=attempt_timeout_s),
        )
        return AnthropicModel(
            config.model_name, provider=AnthropicProvider(anthropic_client=anthropic), settings=settings
        )
    if config.provider == "ollama" and base_url is None:
        base_url = "http://localhost:11434/v1"
    if config.provider != "ollama" and base_url is None and api_key is None:
        where = f"{config.base_url_env} or " if config.base_url_env else ""
        raise ConfigError(
            f"model {config.name!r}: set {where}{config.api_key_env or 'api_key_env'}, or a base_url in the policy"
        )
    client = AsyncOpenAI(
        api_key=api_key or "api-key-not-set",
        base_url=base_url,
        max_retries=0,
        timeout=attempt_timeout_s,
        http_client=DefaultAioHttpClient(timeout=attempt_timeout_s),
    )
    provider = OpenAIProvider(openai_client=client)
    if config.provider == "openai":
        return OpenAIResponsesModel(config.model_name, provider=provider, settings=settings)
    return OpenAIChatModel(config.model_name, provider=provider, settings=settings)


def _api_key(config: ModelConfig) -> str | None:
    if config.api_key_env is None:
        return None
    # A local, OpenAI-compatible server usually takes any key; a hosted one will answer 401,
    # which is permanent for this candidate and moves on to the next.
    return os.environ.get(config.api_key_env) or None


def build_candidates(
    models: Iterable[ModelConfig], output_type: type[OutputT], *, attempt_timeout_s: float, output_retries: int
) -> dict[str, Candidate]:
    """Every model as a stack ``Candidate`` whose target is a ``ModelTarget`` asking for ``output_type``."""
    candidates: dict[str, Candidate] = {}
    for config in models:
        target = ModelTarget(
            model=build_model(config, attempt_timeout_s=attempt_timeout_s),
            output=output_spec(output_type, config.output_mode),
            output_retries=config.output_retries if config.output_retries is not None else output_retries,
            price_input_per_mtok=config.price_input_per_mtok,
            price_output_per_mtok=config.price_output_per_mtok,
        )
        candidates[config.name] = Candidate(config.name, target)
    return candidates


async def close_models(candidates: Iterable[Candidate]) -> None:
    """Close the provider clients of the candidates' models (their HTTP connections), once nothing uses them."""
    for candidate in candidates:
        target: Any = candidate.target
        model = target.model if isinstance(target, ModelTarget) else None
        if isinstance(model, OpenAIChatModel | OpenAIResponsesModel | AnthropicModel):
            await model.client.close()
