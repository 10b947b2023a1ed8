"""The reliability stack in a plain asyncio program: no NATS, no FastStream.

A pydantic-ai agent answers through Route → Fallback → Retry → CircuitBreaker → Timeout. The
"flaky" model is rate-limited twice before it answers; Retry waits and tries again, and a
heuristic stands by in case every model fails. Run it: ``python examples/plain_asyncio.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError, ModelRateLimitError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from tenacity import stop_after_attempt, stop_after_delay, wait_exponential_jitter

from stanchion.middleware import (
    Call,
    Candidate,
    CircuitBreaker,
    Fallback,
    Retry,
    RetryPolicy,
    Route,
    RouteSpec,
    Rule,
    Stack,
    Timeout,
)


@dataclass(frozen=True)
class Event:
    kind: str
    text: str


agent = Agent(output_type=str, instructions="Answer in a few words.")
rate_limited = {"flaky": 2}


def model(name: str) -> FunctionModel:
    """A stand-in for a real provider; swap in e.g. OpenAIChatModel(...) in your service."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if rate_limited.get(name, 0) > 0:
            rate_limited[name] -= 1
            raise ModelHTTPError.for_category(
                ModelRateLimitError, status_code=429, model_name=name, body=None, retry_after=0.2
            )
        return ModelResponse(parts=[TextPart(f"hello from {name}")])

    return FunctionModel(respond, model_name=name)


async def terminal(call: Call) -> str:
    """The innermost step: one agent run with the model the stack chose."""
    assert call.candidate is not None
    call.attempts += 1
    result = await agent.run(call.event.text, model=call.candidate.target)
    return result.output


async def heuristic(call: Call) -> str:
    return "hello from the heuristic"


flaky, steady = Candidate("flaky", model("flaky")), Candidate("steady", model("steady"))
stack: Stack[str] = Stack(
    [
        Route(
            {"default": RouteSpec((flaky, steady)), "urgent": RouteSpec((steady,), heuristic=False)},
            rules=[Rule("urgent", lambda event: event.kind == "urgent", "kind is urgent")],
        ),
        Fallback(heuristic),
        Retry(
            RetryPolicy(
                stop=stop_after_attempt(3) | stop_after_delay(10), wait=wait_exponential_jitter(multiplier=0.1, max=2)
            )
        ),
        CircuitBreaker(),
        Timeout(per_attempt=5.0),
    ],
    terminal,
)


async def main() -> None:
    for event in (Event("simple", "greet me"), Event("urgent", "greet me now")):
        call = Call(event=event, timeout=30.0)
        answer = await stack(call)
        retries = sum(d.kind == "retry" for d in call.decisions)
        print(f"{call.route}: {answer!r} served by {call.served_by}, {call.attempts} attempt(s), {retries} retries")


if __name__ == "__main__":
    asyncio.run(main())
