"""Overhead of the reliability stack: full stack vs the bare agent call, in the same generic handler, in one run.

Both sides are the classifier as ``classify.create_app`` declares it on the public API (``Stanchion(broker)
.agent(...)``, a broker that never connects) and run its ``HandlerRuntime.handle`` (decode the bytes → look
the event up in the result store → run → build the result envelope → store it), with an instant
FunctionModel agent, the result store in memory and no faults. "full" runs the stack the handler was declared
with: Route → Fallback → Retry → CircuitBreaker → Observe → Timeout; "bare" is a second handler declared the
same way whose stack is the declared agent terminal alone. Rounds alternate so that machine noise hits both
sides alike. Usage: ``python -m bench.bench_stack [--events N] [--rounds R]``.

The suite (``python -m bench.suite``) runs this comparison as the in-process row of its overhead comparison,
beside the same comparison through NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import statistics
import time

from pydantic_ai import ToolOutput
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from stanchion.contracts import TaskClassification, TaskEvent
from stanchion.handlers.api import Handler
from stanchion.handlers.classify.app import create_app
from stanchion.handlers.models.providers import ModelTarget
from stanchion.handlers.policy import Policy
from stanchion.handlers.runtime.handler import HandlerRuntime
from stanchion.handlers.runtime.outcome import Answered
from stanchion.handlers.runtime.results import InMemoryResultStore
from stanchion.handlers.settings import Settings
from stanchion.middleware import Call, Candidate, Stack

POLICY = Policy.model_validate(
    {"models": [{"name": "fast", "model": "openai-chat:bench"}], "routes": {"default": {"models": ["fast"]}}}
)
"""One model, one route (then the classifier's heuristic): the candidate is given in code, never built."""

Runtime = HandlerRuntime[TaskEvent, TaskClassification]


async def instant(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    answer = {"category": "bug", "priority": 3, "confidence": 0.9, "summary": "instant"}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, answer)])


def instant_candidate() -> Candidate:
    return Candidate("fast", ModelTarget(FunctionModel(instant), ToolOutput(TaskClassification), 1))


def offline_handler(candidate: Candidate) -> Handler[TaskEvent, TaskClassification]:
    """The classifier's handler as ``create_app`` declares it, on a broker that is never started."""
    settings = Settings(nats_url="nats://127.0.0.1:1")
    _, handler = create_app(settings, POLICY, results=InMemoryResultStore(), candidates={"fast": candidate})
    return handler


def runtimes() -> tuple[Runtime, Runtime]:
    """(full, bare): two declared classifier handlers' runtimes; bare's stack is the full one's terminal alone."""
    candidate = instant_candidate()
    full = offline_handler(candidate)
    bare = offline_handler(candidate)
    terminal = full.terminal  # the AgentTerminal the public API built for the classifier; both sides call it

    async def bare_terminal(call: Call) -> TaskClassification:
        call.candidate = candidate
        result = await terminal(call)
        call.served_by = candidate.name
        return result

    bare.runtime.stack = Stack([], bare_terminal)
    return full.runtime, bare.runtime


_rounds = itertools.count()


async def throughput(runtime: Runtime, events: int, concurrency: int = 16) -> float:
    # Fresh ids every round: an id seen before would be answered from the result store, not by the stack.
    run = next(_rounds)
    payloads = [json.dumps({"id": f"b-{run}-{i}", "text": f"the app crashes {i}"}).encode() for i in range(events)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)

    async def worker() -> None:
        while not queue.empty():
            outcome = await runtime.handle(queue.get_nowait(), subject="tasks.classify")
            assert isinstance(outcome, Answered), outcome
            assert not outcome.stored

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return events / (time.perf_counter() - started)


async def main(events: int, rounds: int) -> None:
    full, bare = runtimes()
    await throughput(full, 200)  # warm-up
    await throughput(bare, 200)
    full_rates, bare_rates = [], []
    for _ in range(rounds):
        bare_rates.append(await throughput(bare, events))
        full_rates.append(await throughput(full, events))
    full_rate, bare_rate = statistics.median(full_rates), statistics.median(bare_rates)
    print(f"python {platform.python_version()} on {platform.machine()}, {events} events x {rounds} rounds")
    print(f"bare agent call : {bare_rate:8.1f} events/s (median)")
    print(f"full stack      : {full_rate:8.1f} events/s (median)")
    print(f"ratio full/bare : {full_rate / bare_rate:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
