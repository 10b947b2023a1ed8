"""Every use of a pydantic-ai private name, in one place (``tests/unit/test_pydantic_ai_adapter.py`` pins them).

pydantic-ai has no public way to ask whether an agent is "simple" (one output model, no validators, no
tools, static instructions), to price a response the way its instrumentation would, or to read the
process-wide default of ``Agent.instrument_all``. Each helper below says what it reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_ai import Agent
from pydantic_ai._genai_prices import fill_response_cost
from pydantic_ai.capabilities.abstract import leaf_capabilities
from pydantic_ai.exceptions import ToolRetryError
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models.instrumented import InstrumentationSettings


def fill_cost(response: ModelResponse) -> None:
    """Set ``response.usage.cost`` from genai-prices when it is unset (pydantic-ai's ``_genai_prices``)."""
    fill_response_cost(response)


def instrument_default() -> InstrumentationSettings | bool:
    """What ``Agent.instrument_all`` set for agents without an ``instrument`` of their own (``_instrument_default``)."""
    return Agent._instrument_default


def _default_capabilities() -> frozenset[type[Any]]:
    plain = Agent(output_type=str, defer_model_check=True)
    return frozenset(type(c) for c in leaf_capabilities(plain.root_capability))


_DEFAULT_CAPABILITIES = _default_capabilities()


def simple_output_type(agent: Agent[Any, Any]) -> type[BaseModel] | None:
    """The agent's output model when a run of it is one plain request and its validation, else ``None``.

    Simple means: the output type is one pydantic model; no output validators (``_output_validators``), no
    system prompt functions (``_system_prompt_functions``), only literal instructions (``_instructions``), no
    tools or toolsets, no capabilities beyond the ones every agent has. Anything else must run ``agent.run``.
    """
    output_type = agent.output_type
    if not (isinstance(output_type, type) and issubclass(output_type, BaseModel)):
        return None
    if agent._output_validators or agent._system_prompt_functions:
        return None
    if not all(isinstance(sourced.instruction, str) for sourced in agent._instructions):
        return None
    toolsets = agent.toolsets
    if len(toolsets) != 1 or getattr(toolsets[0], "tools", None):
        return None
    if not {type(c) for c in leaf_capabilities(agent.root_capability)} <= _DEFAULT_CAPABILITIES:
        return None
    return output_type


def has_output_validators(agent: Agent[Any, Any]) -> bool:
    """Whether the agent has output validators (``_output_validators``): pydantic-ai then refuses a run's own
    ``output_type``, so such an agent is asked for its output in its own mode."""
    return bool(agent._output_validators)


def static_instructions(agent: Agent[Any, Any]) -> list[str]:
    """The agent's literal instructions, in order (only meaningful when ``simple_output_type`` is not ``None``)."""
    return [sourced.instruction for sourced in agent._instructions if isinstance(sourced.instruction, str)]


def output_retry_feedback(exc: BaseException) -> object:
    """What ended a run with "Exceeded maximum output retries", from its cause: the errors of a ``ValidationError``
    (tool mode), or the feedback content of pydantic-ai's ``ToolRetryError`` (not exported; text modes) — a list of
    pydantic error details or a message. ``None`` when the cause is neither."""
    cause = exc.__cause__
    if isinstance(cause, ValidationError):
        return cause.errors(include_input=False, include_url=False)
    if isinstance(cause, ToolRetryError):
        return cause.tool_retry.content
    return None
