"""The classification agent, the model candidates built from the policy, and the terminal step."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from anthropic import AsyncAnthropic
from anthropic import DefaultAioHttpClient as AnthropicAioHttpClient
from openai import AsyncOpenAI, DefaultAioHttpClient
from pydantic import ValidationError
from pydantic_ai import Agent, NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai._genai_prices import fill_response_cost
from pydantic_ai.direct import model_request
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.instrumented import InstrumentationSettings, InstrumentedModel
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.output import OutputSpec
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.run import AgentRunResult
from pydantic_ai.settings import ModelSettings

from stanchion.contracts import TaskClassification, TaskEvent, Usage
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.policy import ModelConfig, OutputMode, Policy
from stanchion.middleware import Call, Candidate

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
    # No max_retries here: the clients below are built with max_retries=0 already, and a max_retries in the model
    # settings makes pydantic-ai copy the SDK client for every request (a visible share of the per-event CPU).
    # The SDKs' aiohttp transport rather than their default httpx pool: about a third less CPU per request, and
    # the httpx pool's cost grows with the requests in flight (bench/RESULTS.md). Proxy variables still apply.
    settings = ModelSettings(timeout=attempt_timeout_s, max_tokens=1024)
    if config.provider == "anthropic":
        anthropic = AsyncAnthropic(
            api_key=api_key or "api-key-not-set",
            base_url=config.base_url,
            max_retries=0,
            timeout=attempt_timeout_s,
            http_client=AnthropicAioHttpClient(timeout=attempt_timeout_s),
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


async def close_models(candidates: Iterable[Candidate]) -> None:
    """Close the provider clients of the candidates' models (their HTTP connections), once nothing uses them."""
    for candidate in candidates:
        target = candidate.target
        model = target.model if isinstance(target, ModelTarget) else None
        if isinstance(model, OpenAIChatModel | OpenAIResponsesModel | AnthropicModel):
            await model.client.close()


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


_FAST_AGENTS: weakref.WeakValueDictionary[int, Agent[None, TaskClassification]] = weakref.WeakValueDictionary()
"""Agents made by ``build_agent``, by id: the ones whose runs ``AgentTerminal`` may take a shortcut for."""


def _new_agent() -> Agent[None, TaskClassification]:
    return Agent(output_type=TaskClassification, instructions=INSTRUCTIONS, defer_model_check=True, name="classifier")


def build_agent(*, instrument: bool | InstrumentationSettings = False) -> Agent[None, TaskClassification]:
    """The classifier agent; ``instrument`` adds pydantic-ai's gen_ai spans and metrics (``True``: without the
    prompt or the answer; pass ``InstrumentationSettings`` to choose providers and content).

    ``AgentTerminal`` answers most runs of this agent without the agent graph (see ``AgentTerminal``), so
    give tools, validators or capabilities to an agent of your own rather than adding them to this one.
    """
    agent = _new_agent()
    if instrument is True:
        agent.instrument = InstrumentationSettings(include_content=False)
    elif isinstance(instrument, InstrumentationSettings):
        agent.instrument = instrument
    _FAST_AGENTS[id(agent)] = agent
    return agent


def prompt(event: TaskEvent) -> str:
    source = f" (from {event.source})" if event.source else ""
    return f"Classify this {event.kind} task{source}:\n\n{event.text}"


_PROBE = "stanchion probe: never sent"


class _Captured(Exception):
    def __init__(self, messages: list[ModelMessage], settings: ModelSettings | None, params: ModelRequestParameters):
        super().__init__("captured")
        self.messages = messages
        self.settings = settings
        self.params = params


class _Capture(WrapperModel):
    """Records what a run would send on its first request, and stops the run there."""

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        raise _Captured(messages, model_settings, model_request_parameters)


class _Priced(WrapperModel):
    """Prices each response once, as it arrives: the instrumentation around it then reports that cost instead of
    pricing the response a second time (genai-prices is a visible share of the per-event CPU).

    It also remembers the last ``prepare_request``: the instrumentation prepares each request once more for its
    span's attributes (walking the output tool's JSON schema), always with the plan's same settings and
    parameters objects, so the second preparation is the first one's result.
    """

    _prepared: (
        tuple[ModelSettings | None, ModelRequestParameters, tuple[ModelSettings | None, ModelRequestParameters]] | None
    ) = None

    def __init__(self, wrapped: Model) -> None:
        super().__init__(wrapped)
        self._base_url = wrapped.base_url

    @property
    def base_url(self) -> str | None:
        """The wrapped model's, read once: the instrumentation asks on every request for its ``server.*``
        attributes, and the SDK client builds the string anew each time."""
        return self._base_url

    def prepare_request(
        self,
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> tuple[ModelSettings | None, ModelRequestParameters]:
        last = self._prepared
        if last is not None and last[0] is model_settings and last[1] is model_request_parameters:
            return last[2]
        prepared = self.wrapped.prepare_request(model_settings, model_request_parameters)
        self._prepared = (model_settings, model_request_parameters, prepared)
        return prepared

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        response = await self.wrapped.request(messages, model_settings, model_request_parameters)
        fill_response_cost(response)
        return response


class _ReplayFirst(WrapperModel):
    """Answers a run's first request with a response already received; later requests go to the model."""

    def __init__(self, wrapped: Model, first: ModelResponse) -> None:
        super().__init__(wrapped)
        self._first: ModelResponse | None = first

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        if (first := self._first) is not None:
            self._first = None
            return first
        return await self.wrapped.request(messages, model_settings, model_request_parameters)


@dataclass
class _Plan:
    """What a run of the agent sends to one target on its first request, learnt once from a real run."""

    instructions: str | None
    settings: ModelSettings | None
    parameters: ModelRequestParameters
    output_tools: frozenset[str]
    """Names of the output tools in tool mode; empty when the output comes as text (native, prompted)."""
    priced: Model
    """The target's model, pricing each response."""
    instrumented: tuple[InstrumentationSettings, Model] | None = None

    def model(self, settings: InstrumentationSettings | None) -> Model:
        if settings is None:
            return self.priced
        if self.instrumented is None or self.instrumented[0] is not settings:
            self.instrumented = (settings, InstrumentedModel(self.priced, settings))
        return self.instrumented[1]

    def accept(self, response: ModelResponse) -> TaskClassification | None:
        """The output the agent would take from ``response`` at once, or ``None`` when the agent must decide.

        Only the plain case is accepted here: one part (the output tool call, or the JSON text), a complete
        response, output that validates as pydantic-ai validates it. Anything else (invalid output, text in
        tool mode, several parts, a truncated or filtered answer) is left to the agent, so its retries,
        feedback and errors stay exactly pydantic-ai's.
        """
        if len(response.parts) != 1 or response.state != "complete":
            return None
        if response.finish_reason not in (None, "stop", "tool_call"):
            return None
        [part] = response.parts
        data: object
        if self.output_tools:
            if not isinstance(part, ToolCallPart) or part.tool_name not in self.output_tools:
                return None
            data = part.args
        elif isinstance(part, TextPart):
            data = part.content
        else:
            return None
        try:
            if isinstance(data, str):
                # pydantic-ai strips markdown fences from text not starting with "{"; leave those to it.
                return TaskClassification.model_validate_json(data) if data.startswith("{") else None
            return TaskClassification.model_validate(data) if isinstance(data, dict) and data else None
        except ValidationError:
            return None


class AgentTerminal:
    """The terminal step: what ``agent.run`` with ``call.candidate``'s model and output mode would return.

    For an agent made by ``build_agent``, the first request goes straight to the model (``model_request``,
    with the request the agent itself would send, learnt once per target from a run stopped before it sends
    anything), and a plain valid answer is taken at once: no agent graph per event. Any other answer, and
    any other agent, goes through ``agent.run``: the answer already received is replayed as the run's first
    response, so retries with validation feedback, ``UnexpectedModelBehavior`` when they are spent, and
    usage and cost are pydantic-ai's own. Provider errors propagate unchanged.

    With instrumentation on, each model request gets pydantic-ai's ``chat`` span from ``InstrumentedModel``
    with the agent's settings; there is no agent-run span.
    """

    def __init__(self, agent: Agent[None, TaskClassification] | None = None) -> None:
        self.agent = agent or build_agent()
        self._fast = _FAST_AGENTS.get(id(self.agent)) is self.agent
        # Probes and replays run on an uninstrumented twin: the requests they make are instrumented by the
        # model itself, and a probe must leave no span.
        self._twin = _new_agent()
        self._twin.instrument = False
        self._plans: dict[int, tuple[ModelTarget, _Plan | None]] = {}
        self._default_settings: InstrumentationSettings | None = None

    async def __call__(self, call: Call) -> TaskClassification:
        if call.candidate is None or not isinstance(call.candidate.target, ModelTarget):
            raise TypeError("AgentTerminal needs call.candidate.target to be a ModelTarget")
        target: ModelTarget = call.candidate.target
        call.attempts += 1
        text = prompt(call.event)
        plan = await self._plan(target) if self._fast else None
        if plan is None:
            return self._record(call, target, await self._run(self.agent, text, target.model, target))
        model = plan.model(self._instrumentation())
        request = ModelRequest(parts=[UserPromptPart(text)], instructions=plan.instructions)
        response = await model_request(
            model, [request], model_settings=plan.settings, model_request_parameters=plan.parameters, instrument=False
        )
        output = plan.accept(response)
        if output is None:
            return self._record(call, target, await self._run(self._twin, text, _ReplayFirst(model, response), target))
        usage = Usage(input_tokens=response.usage.input_tokens, output_tokens=response.usage.output_tokens, requests=1)
        cost = response.usage.cost
        call.add_usage(usage, target.cost(usage, float(cost) if cost is not None else None))
        return output

    @staticmethod
    async def _run(
        agent: Agent[None, TaskClassification], text: str, model: Model, target: ModelTarget
    ) -> AgentRunResult[TaskClassification]:
        return await agent.run(text, model=model, output_type=target.output, retries={"output": target.output_retries})

    @staticmethod
    def _record(call: Call, target: ModelTarget, result: AgentRunResult[TaskClassification]) -> TaskClassification:
        run_usage = result.usage
        usage = Usage(
            input_tokens=run_usage.input_tokens,
            output_tokens=run_usage.output_tokens,
            requests=run_usage.requests,
        )
        reported = float(run_usage.cost) if run_usage.cost is not None else None
        call.add_usage(usage, target.cost(usage, reported))
        return result.output

    def _instrumentation(self) -> InstrumentationSettings | None:
        """The settings ``agent.run`` would instrument with (``agent.instrument``, else ``Agent.instrument_all``)."""
        instrument = self.agent.instrument
        if instrument is None:
            instrument = Agent._instrument_default
        if isinstance(instrument, InstrumentationSettings):
            return instrument
        if not instrument:
            return None
        if self._default_settings is None:
            self._default_settings = InstrumentationSettings()
        return self._default_settings

    async def _plan(self, target: ModelTarget) -> _Plan | None:
        cached = self._plans.get(id(target))
        if cached is not None and cached[0] is target:
            return cached[1]
        plan = await self._probe(target)
        self._plans[id(target)] = (target, plan)
        return plan

    async def _probe(self, target: ModelTarget) -> _Plan | None:
        """Learn the first request of a run, or ``None`` when this target must always take ``agent.run``."""
        if isinstance(target.model, InstrumentedModel) or _output_type(target.output) is not TaskClassification:
            return None
        try:
            await self._run(self._twin, _PROBE, _Capture(target.model), target)
        except _Captured as captured:
            messages, settings, params = captured.messages, captured.settings, captured.params
        except Exception:  # the run cannot even start (e.g. an output mode the model lacks): agent.run says why
            return None
        else:
            return None
        if len(messages) != 1 or not isinstance(request := messages[0], ModelRequest):
            return None
        if (
            len(request.parts) != 1
            or not isinstance(part := request.parts[0], UserPromptPart)
            or part.content != _PROBE
        ):
            return None
        if params.function_tools or params.native_tools:
            return None
        if params.output_mode == "tool":
            tools = frozenset(tool.name for tool in params.output_tools)
            if not tools or params.allow_text_output:
                return None
        elif params.output_mode in ("native", "prompted"):
            tools = frozenset()
        else:
            return None
        return _Plan(request.instructions, settings, params, tools, _Priced(target.model))


def _output_type(spec: OutputSpec[TaskClassification]) -> object:
    """The one type an output spec asks for, ``None`` when it is anything else (several types, functions)."""
    if isinstance(spec, ToolOutput):
        return spec.output
    if isinstance(spec, NativeOutput | PromptedOutput):
        return spec.outputs
    return spec
