"""The pydantic-ai adapter: every private name Stanchion reads, pinned, so a pydantic-ai change fails here first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput, RunContext, ToolOutput
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.instrumented import InstrumentationSettings
from pydantic_ai.usage import RequestUsage

from stanchion.handlers.models.adapter import (
    fill_cost,
    has_output_validators,
    instrument_default,
    output_retry_feedback,
    simple_output_type,
    static_instructions,
)


class Answer(BaseModel):
    value: int


def plain() -> Agent[None, Answer]:
    return Agent(output_type=Answer, instructions="Answer with a number.", defer_model_check=True)


def test_a_plain_output_only_agent_is_simple_with_its_literal_instructions() -> None:
    """One output model, literal instructions, nothing else: simple, and its instructions are readable."""
    agent = plain()
    assert simple_output_type(agent) is Answer
    assert static_instructions(agent) == ["Answer with a number."]
    assert not has_output_validators(agent)


def test_an_output_validator_makes_an_agent_not_simple() -> None:
    """Validators are read from the agent: with one, the agent must run in full."""
    agent = plain()

    @agent.output_validator
    def check(output: Answer) -> Answer:
        return output

    assert has_output_validators(agent)
    assert simple_output_type(agent) is None


def test_a_function_tool_makes_an_agent_not_simple() -> None:
    """A tool registered on the agent is seen through its toolsets."""
    agent = plain()

    @agent.tool_plain
    def lookup(key: str) -> str:
        return key

    assert simple_output_type(agent) is None


def test_dynamic_instructions_or_system_prompts_make_an_agent_not_simple() -> None:
    """Instruction functions and system prompt functions are per-run logic: not simple."""
    with_instructions: Agent[None, Answer] = Agent(
        output_type=Answer, instructions=lambda: "now", defer_model_check=True
    )
    assert simple_output_type(with_instructions) is None

    with_prompt = plain()

    @with_prompt.system_prompt
    def today(ctx: RunContext[None]) -> str:
        return "today"

    assert simple_output_type(with_prompt) is None


def test_an_output_that_is_not_one_pydantic_model_is_not_simple() -> None:
    """Text, unions and other output types take agent.run."""
    assert simple_output_type(Agent(output_type=str, defer_model_check=True)) is None
    assert simple_output_type(Agent(output_type=[Answer, str], defer_model_check=True)) is None


def test_fill_cost_prices_a_response_of_a_known_model_and_leaves_an_unknown_one_unpriced() -> None:
    """genai-prices fills ``usage.cost`` for a model it knows; an unknown model stays ``None`` (unknown, not 0)."""
    known = ModelResponse(
        parts=[TextPart("{}")],
        usage=RequestUsage(input_tokens=1_000_000, output_tokens=0),
        model_name="gpt-4o-mini",
        provider_name="openai",
    )
    fill_cost(known)
    assert known.usage.cost is not None and float(known.usage.cost) > 0
    unknown = ModelResponse(
        parts=[TextPart("{}")], usage=RequestUsage(input_tokens=10), model_name="no-such-model", provider_name="x"
    )
    fill_cost(unknown)
    assert unknown.usage.cost is None


@pytest.fixture
def instrument_all() -> Iterator[None]:
    before = instrument_default()
    yield
    Agent.instrument_all(before)


@pytest.mark.usefixtures("instrument_all")
def test_instrument_default_follows_agent_instrument_all() -> None:
    """What ``Agent.instrument_all`` sets is what the terminal's fast path instruments with."""
    settings = InstrumentationSettings(include_content=False)
    Agent.instrument_all(settings)
    assert instrument_default() is settings
    Agent.instrument_all(False)
    assert instrument_default() is False


@pytest.mark.parametrize("mode", ["tool", "native"])
async def test_output_retry_feedback_reads_the_last_validation_error_of_a_run_out_of_output_retries(mode: str) -> None:
    """The cause of "Exceeded maximum output retries" holds the last validation errors (a ValidationError in tool
    mode, pydantic-ai's unexported ToolRetryError in text modes): the adapter reads them from either."""

    def invalid(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if info.output_tools:
            return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, {"value": "many"})])
        return ModelResponse(parts=[TextPart('{"value": "many"}')])

    agent = Agent(FunctionModel(invalid), output_type=ToolOutput(Answer) if mode == "tool" else NativeOutput(Answer))
    with pytest.raises(UnexpectedModelBehavior) as raised:
        await agent.run("how many?", retries={"output": 1})
    assert str(raised.value) == "Exceeded maximum output retries (1)"
    feedback = output_retry_feedback(raised.value)
    assert isinstance(feedback, list) and [(tuple(e["loc"]), e["type"]) for e in feedback] == [
        (("value",), "int_parsing")
    ]
