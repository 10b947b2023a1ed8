"""The classification agent, the model candidates built from the policy, and the terminal step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from pydantic_ai import Agent, NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai.models import Model
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.instrumented import InstrumentationSettings
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.output import OutputSpec
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

from contracts import TaskClassification, TaskEvent, Usage
from handlers.errors import ConfigError
from handlers.policy import ModelConfig, OutputMode, Policy
from middleware import Call, Candidate

INSTRUCTIONS = """\
You classify tasks and messages sent to a software team.
Return:
- category: "bug" (something is broken or behaves wrongly), "feature" (a request for new or changed
  behaviour), "question" (someone asks how or why), or "other".
- priority: 1 (can wait) to 5 (urgent: outage, security, data loss, blocking production).
- confidence: how sure you are of the category, from 0 to 1.
- summary: one short sentence saying what the task is about.
Answer only with the structured result."""


@dataclass(frozen=True)
class ModelTarget:
    """What the terminal needs to call one candidate."""

    model: Model
    output: OutputSpec[TaskClassification]
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


def output_spec(mode: OutputMode) -> OutputSpec[TaskClassification]:
    """Tool calls (default), the provider's native JSON schema, or a schema in the prompt (for small local models)."""
    if mode == "native":
        return NativeOutput(TaskClassification)
    if mode == "prompted":
        return PromptedOutput(TaskClassification)
    return ToolOutput(TaskClassification)


def build_model(config: ModelConfig, *, attempt_timeout_s: float) -> Model:
    """A pydantic-ai model for one candidate, with the SDK's own retries off (our Retry is the only one)."""
    api_key = _api_key(config)
    # max_tokens: classification answers are short, and Anthropic streams requests allowed more than ~21k tokens.
    settings = ModelSettings(max_retries=0, timeout=attempt_timeout_s, max_tokens=1024)
    if config.provider == "anthropic":
        anthropic = AsyncAnthropic(
            api_key=api_key or "api-key-not-set",
            base_url=config.base_url,
            max_retries=0,
            timeout=attempt_timeout_s,
        )
        return AnthropicModel(
            config.model_name, provider=AnthropicProvider(anthropic_client=anthropic), settings=settings
        )
    base_url = config.base_url
    if config.provider == "ollama" and base_url is None:
        base_url = "http://localhost:11434/v1"
    if config.provider != "ollama" and base_url is None and api_key is None:
        raise ConfigError(f"model {config.name!r}: set {config.api_key_env or 'api_key_env'} or a base_url")
    client = AsyncOpenAI(
        api_key=api_key or "api-key-not-set", base_url=base_url, max_retries=0, timeout=attempt_timeout_s
    )
    provider = OpenAIProvider(openai_client=client)
    if config.provider == "openai":
        return OpenAIResponsesModel(config.model_name, provider=provider, settings=settings)
    return OpenAIChatModel(config.model_name, provider=provider, settings=settings)


def _api_key(config: ModelConfig) -> str | None:
    if config.api_key_env is None:
        return None
    value = os.environ.get(config.api_key_env)
    if not value:
        # A local, OpenAI-compatible server usually takes any key; a hosted one will answer 401,
        # which is permanent for this candidate and moves on to the next.
        return None
    return value


def build_candidates(policy: Policy, *, attempt_timeout_s: float, output_retries: int) -> dict[str, Candidate]:
    """Every model of the policy as a stack ``Candidate`` whose target is a ``ModelTarget``."""
    candidates: dict[str, Candidate] = {}
    for config in policy.models:
        target = ModelTarget(
            model=build_model(config, attempt_timeout_s=attempt_timeout_s),
            output=output_spec(config.output_mode),
            output_retries=config.output_retries if config.output_retries is not None else output_retries,
            price_input_per_mtok=config.price_input_per_mtok,
            price_output_per_mtok=config.price_output_per_mtok,
        )
        candidates[config.name] = Candidate(config.name, target)
    return candidates


def build_agent(*, instrument: bool | InstrumentationSettings = False) -> Agent[None, TaskClassification]:
    """The classifier agent; ``instrument`` adds pydantic-ai's gen_ai spans and metrics (``True``: without the
    prompt or the answer; pass ``InstrumentationSettings`` to choose providers and content)."""
    agent = Agent(output_type=TaskClassification, instructions=INSTRUCTIONS, defer_model_check=True, name="classifier")
    if instrument is True:
        agent.instrument = InstrumentationSettings(include_content=False)
    elif isinstance(instrument, InstrumentationSettings):
        agent.instrument = instrument
    return agent


def prompt(event: TaskEvent) -> str:
    source = f" (from {event.source})" if event.source else ""
    return f"Classify this {event.kind} task{source}:\n\n{event.text}"


class AgentTerminal:
    """The terminal step: one ``agent.run`` with ``call.candidate``'s model and output mode."""

    def __init__(self, agent: Agent[None, TaskClassification] | None = None) -> None:
        self.agent = agent or build_agent()

    async def __call__(self, call: Call) -> TaskClassification:
        if call.candidate is None or not isinstance(call.candidate.target, ModelTarget):
            raise TypeError("AgentTerminal needs call.candidate.target to be a ModelTarget")
        target: ModelTarget = call.candidate.target
        call.attempts += 1
        result: Any = await self.agent.run(
            prompt(call.event),
            model=target.model,
            output_type=target.output,
            retries={"output": target.output_retries},
        )
        run_usage = result.usage
        usage = Usage(
            input_tokens=run_usage.input_tokens,
            output_tokens=run_usage.output_tokens,
            requests=run_usage.requests,
        )
        reported = float(run_usage.cost) if getattr(run_usage, "cost", None) is not None else None
        call.add_usage(usage, target.cost(usage, reported))
        output: TaskClassification = result.output
        return output
