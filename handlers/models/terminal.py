"""The terminal step: what ``agent.run`` with ``call.candidate``'s model and output mode would return.

For a simple agent (``adapter.simple_output_type``: one pydantic output model, no validators, no tools,
literal instructions, no deps), the first request goes straight to the model (``model_request``, with the
request the agent itself would send, learnt once per target from a run stopped before it sends anything),
and a plain valid answer is taken at once: no agent graph per event. Any other answer, and any other agent,
goes through ``agent.run``: for a simple agent the answer already received is replayed as the run's first
response, so retries with validation feedback, ``UnexpectedModelBehavior`` when they are spent, and usage
and cost are pydantic-ai's own. Provider errors propagate unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_ai import Agent, AgentRetries, NativeOutput, PromptedOutput, ToolOutput, capture_run_messages
from pydantic_ai.direct import model_request
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryFeedbackPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.instrumented import InstrumentationSettings, InstrumentedModel
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.output import OutputSpec
from pydantic_ai.run import AgentRunResult
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage

from stanchion.contracts import Usage
from stanchion.handlers.models.adapter import (
    fill_cost,
    has_output_validators,
    instrument_default,
    output_retry_feedback,
    simple_output_type,
    static_instructions,
)
from stanchion.handlers.models.providers import ModelTarget
from stanchion.middleware import Call, InvalidOutput

EventT = TypeVar("EventT")
OutputT = TypeVar("OutputT")

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
        fill_cost(response)
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
class _Plan(Generic[OutputT]):
    """What a run of the agent sends to one target on its first request, learnt once from a real run."""

    output_type: type[BaseModel]
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

    def accept(self, response: ModelResponse) -> OutputT | None:
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
                output = self.output_type.model_validate_json(data) if data.startswith("{") else None
            else:
                output = self.output_type.model_validate(data) if isinstance(data, dict) and data else None
        except ValidationError:
            return None
        return output  # type: ignore[return-value]  # the plan's output type is OutputT


class AgentTerminal(Generic[EventT, OutputT]):
    """Runs ``agent`` for one event with ``call.candidate``'s model and output mode.

    Args:
        agent: Any pydantic-ai agent; its ``output_type`` is the output.
        prompt: The user prompt of an event.
        deps: The agent's ``deps`` for an event (``None``: the agent takes none). An agent with deps always
            runs ``agent.run``.

    With instrumentation on, each model request of the fast path gets pydantic-ai's ``chat`` span from
    ``InstrumentedModel`` with the agent's settings; there is no agent-run span on that path.

    ``fast_requests`` and ``agent_runs`` count which path each call took.
    """

    def __init__(
        self,
        agent: Agent[Any, OutputT],
        prompt: Callable[[EventT], str],
        *,
        deps: Callable[[EventT], Any] | None = None,
    ) -> None:
        self.agent = agent
        self.prompt = prompt
        self.deps = deps
        self.output_type = simple_output_type(agent) if deps is None else None
        self.fast_requests = 0
        self.agent_runs = 0
        self._twin: Agent[None, Any] | None = None
        if self.output_type is not None:
            # Probes and replays run on an uninstrumented twin with the same output and instructions: the requests
            # they make are instrumented by the model itself, and a probe must leave no span.
            instructions = static_instructions(agent)
            self._twin = Agent(
                output_type=self.output_type,
                instructions=instructions or None,
                name=agent.name,
                model_settings=agent.model_settings,
                defer_model_check=True,
            )
            self._twin.instrument = False
        self._plans: dict[int, tuple[ModelTarget[Any], _Plan[OutputT] | None]] = {}
        self._default_settings: InstrumentationSettings | None = None

    @property
    def fast(self) -> bool:
        """Whether this agent may take the fast path (per target, the probe may still say no)."""
        return self._twin is not None

    async def __call__(self, call: Call) -> OutputT:
        if call.candidate is None or not isinstance(call.candidate.target, ModelTarget):
            raise TypeError("AgentTerminal needs call.candidate.target to be a ModelTarget")
        target: ModelTarget[OutputT] = call.candidate.target
        call.attempts += 1
        event: EventT = call.event
        text = self.prompt(event)
        plan = await self._plan(target) if self._twin is not None else None
        if plan is None:
            self.agent_runs += 1
            deps = self.deps(event) if self.deps is not None else None
            return await self._counted(call, target, self.agent, text, target.model, deps)
        self.fast_requests += 1
        model = plan.model(self._instrumentation())
        request = ModelRequest(parts=[UserPromptPart(text)], instructions=plan.instructions)
        response = await model_request(
            model, [request], model_settings=plan.settings, model_request_parameters=plan.parameters, instrument=False
        )
        output = plan.accept(response)
        if output is None:
            twin = self._twin
            assert twin is not None
            return await self._counted(call, target, twin, text, _ReplayFirst(model, response))
        usage = Usage(input_tokens=response.usage.input_tokens, output_tokens=response.usage.output_tokens, requests=1)
        cost = response.usage.cost
        call.add_usage(usage, target.cost(usage, float(cost) if cost is not None else None))
        return output

    async def _counted(
        self,
        call: Call,
        target: ModelTarget[OutputT],
        agent: Agent[Any, Any],
        text: str,
        model: Model,
        deps: Any = None,
    ) -> OutputT:
        """``agent.run``, with the tokens and cost of every response it received added to the call — also when the
        run fails (e.g. output still invalid after its retries): those requests were paid for too.

        Each output retry of the run becomes an ``output_retry`` decision with its validation errors; a run whose
        output is still invalid when its retries are spent raises ``InvalidOutput`` with the last errors.
        """
        run_usage = RunUsage()  # pydantic-ai adds to the usage it is given as the run goes, whatever its end
        spent: UnexpectedModelBehavior | None = None
        with capture_run_messages() as messages:
            try:
                result = await self._run(agent, text, model, target, deps, run_usage)
            except UnexpectedModelBehavior as exc:
                if not str(exc).startswith("Exceeded maximum output retries"):
                    raise
                spent = exc
            finally:
                feedback = _feedback(messages)
                _retry_decisions(call, feedback)
                usage = Usage(
                    input_tokens=run_usage.input_tokens,
                    output_tokens=run_usage.output_tokens,
                    requests=run_usage.requests,
                )
                if usage.requests:
                    reported = float(run_usage.cost) if run_usage.cost is not None else None
                    call.add_usage(usage, target.cost(usage, reported))
        if spent is not None:
            last = validation_errors(output_retry_feedback(spent)) or (feedback[-1] if feedback else [])
            raise InvalidOutput(call.candidate.name if call.candidate else None, last, target.output_retries) from spent
        return result.output

    @staticmethod
    async def _run(
        agent: Agent[Any, Any],
        text: str,
        model: Model,
        target: ModelTarget[OutputT],
        deps: Any = None,
        usage: RunUsage | None = None,
    ) -> AgentRunResult[OutputT]:
        retries: AgentRetries = {"output": target.output_retries}
        if has_output_validators(agent):
            # pydantic-ai refuses another output spec than the agent's own when it has validators: its own mode.
            own: AgentRunResult[OutputT] = await agent.run(text, model=model, retries=retries, deps=deps, usage=usage)
            return own
        result: AgentRunResult[OutputT] = await agent.run(
            text, model=model, output_type=target.output, retries=retries, deps=deps, usage=usage
        )
        return result

    def _instrumentation(self) -> InstrumentationSettings | None:
        """The settings ``agent.run`` would instrument with (``agent.instrument``, else ``Agent.instrument_all``)."""
        instrument = self.agent.instrument
        if instrument is None:
            instrument = instrument_default()
        if isinstance(instrument, InstrumentationSettings):
            return instrument
        if not instrument:
            return None
        if self._default_settings is None:
            self._default_settings = InstrumentationSettings()
        return self._default_settings

    async def _plan(self, target: ModelTarget[OutputT]) -> _Plan[OutputT] | None:
        cached = self._plans.get(id(target))
        if cached is not None and cached[0] is target:
            return cached[1]
        plan = await self._probe(target)
        self._plans[id(target)] = (target, plan)
        return plan

    async def _probe(self, target: ModelTarget[OutputT]) -> _Plan[OutputT] | None:
        """Learn the first request of a run, or ``None`` when this target must always take ``agent.run``."""
        twin, output_type = self._twin, self.output_type
        if twin is None or output_type is None:
            return None
        if isinstance(target.model, InstrumentedModel) or _output_type(target.output) is not output_type:
            return None
        try:
            await self._run(twin, _PROBE, _Capture(target.model), target)
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
        return _Plan(output_type, request.instructions, settings, params, tools, _Priced(target.model))


def validation_errors(content: object) -> list[dict[str, str]]:
    """``{"field", "message"}`` of each error of pydantic-ai's retry feedback (never the invalid input itself)."""
    if isinstance(content, str):
        return [{"field": "", "message": content[:300]}]
    errors: list[dict[str, str]] = []
    if isinstance(content, list):
        for error in content:
            if isinstance(error, dict):
                loc = error.get("loc") or ()
                field = ".".join(str(p) for p in loc) if isinstance(loc, list | tuple) else str(loc)
                errors.append({"field": field, "message": str(error.get("msg", ""))[:300]})
    return errors


def _feedback(messages: list[ModelMessage]) -> list[list[dict[str, str]]]:
    """The validation errors of each output retry in a run's messages, in order."""
    found: list[list[dict[str, str]]] = []
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, RetryFeedbackPart) or (
                    isinstance(part, ToolReturnPart) and part.outcome == "retried"
                ):
                    found.append(validation_errors(part.content))
    return found


def _retry_decisions(call: Call, feedback: list[list[dict[str, str]]]) -> None:
    for number, errors in enumerate(feedback, start=1):
        detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
        call.decide("output_retry", f"output invalid, asked again: {detail}", retry=number, errors=errors)


def _output_type(spec: OutputSpec[Any]) -> object:
    """The one type an output spec asks for, ``None`` when it is anything else (several types, functions)."""
    if isinstance(spec, ToolOutput):
        return spec.output
    if isinstance(spec, NativeOutput | PromptedOutput):
        return spec.outputs
    return spec
