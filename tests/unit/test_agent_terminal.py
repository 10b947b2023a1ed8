"""AgentTerminal: the same output, retries, errors, usage and spans as ``agent.run``, without the agent graph per event.

Every behaviour is checked against a plain ``agent.run`` on the same scripted model: with pydantic-ai's
``FunctionModel``, and over real HTTP with the fake OpenAI-compatible server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelAPIError, UnexpectedModelBehavior, UserError
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.instrumented import InstrumentationSettings
from pydantic_ai.usage import RequestUsage

from stanchion.contracts import TaskClassification, TaskEvent, Usage
from stanchion.handlers.classify.agent import build_agent, prompt
from stanchion.handlers.models.providers import ModelTarget, build_model, close_models, output_spec
from stanchion.handlers.models.terminal import AgentTerminal
from stanchion.handlers.policy import ModelConfig, OutputMode
from stanchion.middleware import Call, Candidate, InvalidOutput
from tests.fake_openai import FakeOpenAI

MODES: list[OutputMode] = ["tool", "native", "prompted"]
EVENT = TaskEvent(id="e1", text="The login page returns 500 since this morning's deploy", source="support")
GOOD = {"category": "bug", "priority": 4, "confidence": 0.9, "summary": "Login fails after deploy"}
BAD = {**GOOD, "priority": 9}  # out of range: fails the schema


class Scripted:
    """A ``FunctionModel`` answering from a script (dicts as the output, strings as text), recording its requests."""

    def __init__(self, *answers: dict[str, Any] | str) -> None:
        self.answers = list(answers)
        self.seen: list[list[ModelMessage]] = []
        self.infos: list[AgentInfo] = []
        self.model = FunctionModel(self._answer, model_name="scripted")

    async def _answer(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.seen.append(messages)
        self.infos.append(info)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        usage = RequestUsage(input_tokens=50 + len(self.seen), output_tokens=20)
        if isinstance(answer, str):
            return ModelResponse(parts=[TextPart(answer)], usage=usage)
        if info.output_tools:
            call_id = f"call_{len(self.seen)}"
            return ModelResponse(
                parts=[ToolCallPart(info.output_tools[0].name, json.dumps(answer), call_id)], usage=usage
            )
        return ModelResponse(parts=[TextPart(json.dumps(answer))], usage=usage)


def classifier_terminal() -> AgentTerminal[TaskEvent, TaskClassification]:
    return AgentTerminal(build_agent(), prompt)


def instrumented(settings: InstrumentationSettings) -> Agent[None, TaskClassification]:
    """The classifier agent with pydantic-ai's instrumentation on."""
    agent = build_agent()
    agent.instrument = settings
    return agent


def target(
    model: Model, mode: OutputMode = "tool", retries: int = 2, **prices: float
) -> ModelTarget[TaskClassification]:
    return ModelTarget(model=model, output=output_spec(TaskClassification, mode), output_retries=retries, **prices)


def make_call(model_target: ModelTarget[TaskClassification]) -> Call:
    call = Call(event=EVENT)
    call.candidate = Candidate("m", model_target)
    return call


async def naive(
    model_target: ModelTarget[TaskClassification], agent: Agent[None, TaskClassification] | None = None
) -> Call:
    """What AgentTerminal did before the fast path: one plain ``agent.run``; returns the call it accounted on."""
    call = make_call(model_target)
    result = await (agent or build_agent()).run(
        prompt(EVENT),
        model=model_target.model,
        output_type=model_target.output,
        retries={"output": model_target.output_retries},
    )
    usage = Usage(
        input_tokens=result.usage.input_tokens,
        output_tokens=result.usage.output_tokens,
        requests=result.usage.requests,
    )
    reported = float(result.usage.cost) if result.usage.cost is not None else None
    call.add_usage(usage, model_target.cost(usage, reported))
    call.served_by = result.output.model_dump_json()  # carries the output back for comparison
    return call


async def fast(
    model_target: ModelTarget[TaskClassification], terminal: AgentTerminal[TaskEvent, TaskClassification] | None = None
) -> Call:
    call = make_call(model_target)
    output = await (terminal or classifier_terminal())(call)
    call.served_by = output.model_dump_json()
    return call


def comparable(messages: list[ModelMessage]) -> list[Any]:
    """Messages as data, without what differs between any two runs (timestamps, run and conversation ids)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("timestamp", "run_id", "conversation_id")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [strip(m) for m in ModelMessagesTypeAdapter.dump_python(messages, mode="json")]


def sent_by_agent_run(messages: list[ModelMessage]) -> bool:
    """``agent.run`` stamps its run id on the messages it sends; the fast path's first request has none."""
    return messages[0].run_id is not None


# -- FunctionModel -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_valid_output_in_one_request_without_the_agent_graph(mode: OutputMode) -> None:
    """A valid answer is returned after one request, sent directly, with agent.run's output, usage and count."""
    before, after = Scripted(GOOD), Scripted(GOOD)

    expected = await naive(target(before.model, mode))
    call = await fast(target(after.model, mode))

    assert TaskClassification.model_validate_json(call.served_by or "") == TaskClassification(**GOOD)
    assert call.served_by == expected.served_by
    assert call.usage == expected.usage == Usage(input_tokens=51, output_tokens=20, requests=1)
    assert call.attempts == 1
    assert not sent_by_agent_run(after.seen[0])


@pytest.mark.parametrize("mode", MODES)
async def test_sends_what_agent_run_sends(mode: OutputMode) -> None:
    """The direct request has agent.run's messages, instructions, output tools or schema, and settings."""
    before, after = Scripted(GOOD), Scripted(GOOD)

    await naive(target(before.model, mode))
    await fast(target(after.model, mode))

    assert comparable(after.seen[0]) == comparable(before.seen[0])
    assert after.infos[0].model_request_parameters == before.infos[0].model_request_parameters
    assert after.infos[0].model_settings == before.infos[0].model_settings
    assert after.infos[0].instructions == before.infos[0].instructions


@pytest.mark.parametrize("mode", MODES)
async def test_schema_invalid_output_is_retried_with_the_validation_error(mode: OutputMode) -> None:
    """An answer failing the schema is fed back to the model as agent.run does, and the retry's answer is returned."""
    before, after = Scripted(BAD, GOOD), Scripted(BAD, GOOD)

    expected = await naive(target(before.model, mode))
    call = await fast(target(after.model, mode))

    assert call.served_by == expected.served_by
    assert call.usage == expected.usage == Usage(input_tokens=103, output_tokens=40, requests=2)
    assert len(after.seen) == 2
    assert "less than or equal to 5" in json.dumps(comparable(after.seen[1]))
    assert comparable(after.seen[1]) == comparable(before.seen[1])


async def test_text_instead_of_the_output_tool_is_left_to_the_agent() -> None:
    """Plain text in tool mode gets pydantic-ai's own retry prompt, then the tool call is taken."""
    before, after = Scripted("It is a bug.", GOOD), Scripted("It is a bug.", GOOD)

    expected = await naive(target(before.model))
    call = await fast(target(after.model))

    assert call.served_by == expected.served_by
    assert call.usage == expected.usage
    assert comparable(after.seen[1]) == comparable(before.seen[1])


@pytest.mark.parametrize("mode", MODES)
async def test_exhausted_output_retries_raise_invalid_output_from_agent_runs_error(mode: OutputMode) -> None:
    """Still invalid after ``output_retries`` retries: ``InvalidOutput`` with the last validation error, raised from
    agent.run's own UnexpectedModelBehavior, after as many requests; the retry is a decision with its errors."""
    before, after = Scripted(BAD), Scripted(BAD)

    with pytest.raises(UnexpectedModelBehavior) as expected:
        await naive(target(before.model, mode, retries=1))
    call = make_call(target(after.model, mode, retries=1))
    with pytest.raises(InvalidOutput) as raised:
        await classifier_terminal()(call)

    cause = raised.value.__cause__
    assert type(cause) is type(expected.value) and str(cause) == str(expected.value)
    assert raised.value.errors == [{"field": "priority", "message": "Input should be less than or equal to 5"}]
    assert raised.value.retries == 1 and "priority: Input should be less than or equal to 5" in str(raised.value)
    assert len(after.seen) == len(before.seen) == 2
    assert call.attempts == 1
    [retry] = [d for d in call.decisions if d.kind == "output_retry"]
    assert retry.data == {"retry": 1, "errors": raised.value.errors}


@pytest.mark.parametrize("mode", MODES)
async def test_the_tokens_and_cost_of_a_run_that_fails_are_counted(mode: OutputMode) -> None:
    """Output still invalid after its retries: the run fails, but both requests' tokens and cost are on the call
    (they were paid for), as ``agent.run`` itself counts them."""
    scripted = Scripted(BAD)
    call = make_call(target(scripted.model, mode, retries=1, price_input_per_mtok=2.0, price_output_per_mtok=10.0))
    with pytest.raises(InvalidOutput):
        await classifier_terminal()(call)
    assert call.usage.requests == 2 == len(scripted.seen)
    assert call.usage.input_tokens == 51 + 52 and call.usage.output_tokens == 40
    assert call.cost_usd == pytest.approx(((51 + 52) * 2.0 + 40 * 10.0) / 1_000_000)


async def test_policy_prices_apply_to_the_fast_path() -> None:
    """With prices in the policy, the cost is computed from the tokens of the request."""
    call = await fast(target(Scripted(GOOD).model, price_input_per_mtok=2.0, price_output_per_mtok=10.0))

    assert call.cost_usd == pytest.approx((51 * 2.0 + 20 * 10.0) / 1_000_000)


async def test_an_own_output_only_agent_takes_the_fast_path_with_its_own_instructions() -> None:
    """Any agent whose output is one model, with literal instructions and no tools, answers with one direct request."""
    agent: Agent[None, TaskClassification] = Agent(
        output_type=TaskClassification, instructions="Answer as a pirate.", defer_model_check=True
    )
    scripted = Scripted(GOOD)
    terminal = AgentTerminal(agent, prompt)

    call = await fast(target(scripted.model), terminal)

    assert scripted.infos[0].instructions == "Answer as a pirate."
    assert not sent_by_agent_run(scripted.seen[0])
    assert (terminal.fast_requests, terminal.agent_runs) == (1, 0)
    assert call.usage.requests == 1


async def test_an_agent_with_a_validator_runs_in_full() -> None:
    """An output validator is the agent's own logic: such an agent always runs agent.run, and the validator runs."""
    agent: Agent[None, TaskClassification] = Agent(output_type=TaskClassification, defer_model_check=True)
    validated: list[TaskClassification] = []

    @agent.output_validator
    def remember(output: TaskClassification) -> TaskClassification:
        validated.append(output)
        return output

    scripted = Scripted(GOOD)
    terminal = AgentTerminal(agent, prompt)

    call = await fast(target(scripted.model), terminal)

    assert sent_by_agent_run(scripted.seen[0])
    assert (terminal.fast_requests, terminal.agent_runs) == (0, 1)
    assert len(validated) == 1 and call.usage.requests == 1


# -- instrumentation ---------------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter, provider
    provider.shutdown()


def chat_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]


@pytest.mark.parametrize("mode", MODES)
async def test_instrumented_requests_get_agent_runs_chat_spans(
    mode: OutputMode, spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    """Each model request has a gen_ai chat span with the model and its token usage, and no content."""
    exporter, provider = spans
    settings = InstrumentationSettings(tracer_provider=provider, include_content=False)

    await naive(target(Scripted(BAD, GOOD).model, mode), instrumented(settings))
    expected = chat_spans(exporter)
    exporter.clear()
    await fast(target(Scripted(BAD, GOOD).model, mode), AgentTerminal(instrumented(settings), prompt))
    got = chat_spans(exporter)

    assert [s.name for s in got] == [s.name for s in expected] == ["chat scripted", "chat scripted"]
    for span, reference in zip(got, expected, strict=True):
        attributes = dict(span.attributes or {})
        assert attributes["gen_ai.request.model"] == "scripted"
        assert attributes["gen_ai.usage.input_tokens"] == (reference.attributes or {})["gen_ai.usage.input_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == 20
        assert "Login fails" not in json.dumps(attributes)
        assert set(attributes) - {"gen_ai.agent.name", "gen_ai.agent.call.id", "gen_ai.conversation.id"} <= set(
            reference.attributes or {}
        )


async def test_uninstrumented_agent_makes_no_spans(spans: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    """With instrumentation off nothing is traced, even after an instrumented terminal ran on the same target."""
    exporter, provider = spans
    shared = target(Scripted(GOOD).model)
    await fast(shared, AgentTerminal(instrumented(InstrumentationSettings(tracer_provider=provider)), prompt))
    exporter.clear()

    await fast(shared, classifier_terminal())

    assert exporter.get_finished_spans() == ()


# -- over HTTP ---------------------------------------------------------------------------------------------------


HttpTarget = Callable[..., ModelTarget[TaskClassification]]


@pytest.fixture
async def http_target() -> AsyncIterator[HttpTarget]:
    """Targets on a real HTTP provider: ``http_target(server, mode="tool", provider="openai-chat")``; their clients
    are closed after the test."""
    made: list[ModelTarget[TaskClassification]] = []

    def make(
        server: FakeOpenAI, mode: OutputMode = "tool", provider: str = "openai-chat"
    ) -> ModelTarget[TaskClassification]:
        config = ModelConfig(name="m", model=f"{provider}:gpt-4o-mini", base_url=server.base_url, output_mode=mode)
        made.append(
            ModelTarget(
                model=build_model(config, attempt_timeout_s=5.0),
                output=output_spec(TaskClassification, mode),
                output_retries=2,
            )
        )
        return made[-1]

    yield make
    await close_models(Candidate("m", target) for target in made)


@pytest.mark.parametrize("mode", MODES)
async def test_over_http_the_same_request_body_output_and_usage(
    mode: OutputMode, fake_openai: Callable[..., FakeOpenAI], http_target: HttpTarget
) -> None:
    """Over real HTTP the provider gets the same body as from agent.run, and output, usage and cost agree."""
    server = fake_openai()

    expected = await naive(http_target(server, mode))
    call = await fast(http_target(server, mode))

    [before, after] = server.requests
    assert after.body == before.body
    assert call.served_by == expected.served_by
    assert call.usage == expected.usage
    assert call.usage.requests == 1
    assert call.cost_usd == expected.cost_usd


@pytest.mark.parametrize("mode", MODES)
async def test_over_http_invalid_output_is_retried_then_succeeds(
    mode: OutputMode, fake_openai: Callable[..., FakeOpenAI], http_target: HttpTarget
) -> None:
    """A schema-invalid answer over HTTP is retried with the same feedback body as agent.run's, then succeeds."""
    before, after = fake_openai(), fake_openai()  # two servers: each numbers its tool calls from the start
    before.set(script=["invalid", "ok"])
    after.set(script=["invalid", "ok"])

    expected = await naive(http_target(before, mode))
    call = await fast(http_target(after, mode))

    assert [r.body for r in after.requests] == [r.body for r in before.requests]
    assert after.count == 2
    assert call.served_by == expected.served_by
    assert call.usage == expected.usage
    assert call.usage.requests == 2
    assert call.cost_usd == expected.cost_usd


async def test_over_http_exhausted_retries_raise_invalid_output(
    fake_openai: Callable[..., FakeOpenAI], http_target: HttpTarget
) -> None:
    """Always invalid over HTTP: InvalidOutput (from agent.run's UnexpectedModelBehavior) after 1 + output_retries
    requests."""
    server = fake_openai(always="invalid")

    with pytest.raises(InvalidOutput) as raised:
        await fast(http_target(server))
    assert isinstance(raised.value.__cause__, UnexpectedModelBehavior)

    assert server.count == 3


@pytest.mark.parametrize("fault", ["500", "429", "401", "reset", "malformed"])
async def test_over_http_provider_errors_propagate_as_from_agent_run(
    fault: str, fake_openai: Callable[..., FakeOpenAI], http_target: HttpTarget
) -> None:
    """HTTP errors, resets and unreadable bodies raise the very exception type agent.run raises, after one request."""
    server = fake_openai(always=fault, retry_after=0.0)

    with pytest.raises(ModelAPIError) as expected:
        await naive(http_target(server))
    with pytest.raises(ModelAPIError) as raised:
        await fast(http_target(server))

    assert type(raised.value) is type(expected.value)
    assert isinstance(raised.value, ModelAPIError)
    assert getattr(raised.value, "status_code", None) == getattr(expected.value, "status_code", None)
    assert server.count == 2


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", MODES)
async def test_other_providers_reach_the_same_endpoint_and_fail_alike(
    provider: str, mode: OutputMode, fake_openai: Callable[..., FakeOpenAI], http_target: HttpTarget
) -> None:
    """Responses and Anthropic models go to their own endpoint (a 404 here) and raise what agent.run raises."""
    server = fake_openai()

    # Anthropic has no native structured output for this model name: a UserError from both paths.
    with pytest.raises((ModelAPIError, UserError)) as expected:
        await naive(http_target(server, mode, provider))
    with pytest.raises((ModelAPIError, UserError)) as raised:
        await fast(http_target(server, mode, provider))

    assert type(raised.value) is type(expected.value)
    assert str(raised.value) == str(expected.value)


async def test_over_http_instrumented_chat_spans(
    fake_openai: Callable[..., FakeOpenAI], spans: tuple[InMemorySpanExporter, TracerProvider], http_target: HttpTarget
) -> None:
    """Over HTTP with tracing on, each request has a chat span with the provider's token counts."""
    exporter, provider = spans
    server = fake_openai()
    server.set(script=["invalid", "ok"])
    agent = instrumented(InstrumentationSettings(tracer_provider=provider, include_content=False))

    call = await fast(http_target(server), AgentTerminal(agent, prompt))

    got = chat_spans(exporter)
    assert [s.name for s in got] == ["chat gpt-4o-mini", "chat gpt-4o-mini"]
    input_tokens = [(s.attributes or {})["gen_ai.usage.input_tokens"] for s in got]
    assert sum(t for t in input_tokens if isinstance(t, int)) == call.usage.input_tokens
    assert all((s.attributes or {})["gen_ai.usage.output_tokens"] == 20 for s in got)
