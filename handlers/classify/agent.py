"""The classifier's agent and prompt: a plain output-only agent, so it takes the terminal's fast path."""

from __future__ import annotations

from pydantic_ai import Agent

from stanchion.contracts import TaskClassification, TaskEvent

INSTRUCTIONS = """\
You classify tasks and messages sent to a software team.
Return:
- category: "bug" (something is broken or behaves wrongly), "feature" (a request for new or changed
  behaviour), "question" (someone asks how or why), or "other".
- priority: 1 (can wait) to 5 (urgent: outage, security, data loss, blocking production).
- confidence: how sure you are of the category, from 0 to 1.
- summary: one short sentence saying what the task is about.
Answer only with the structured result."""


def build_agent() -> Agent[None, TaskClassification]:
    """The classifier agent (instrumented by the handler when tracing is configured)."""
    return Agent(output_type=TaskClassification, instructions=INSTRUCTIONS, defer_model_check=True, name="classifier")


def prompt(event: TaskEvent) -> str:
    source = f" (from {event.source})" if event.source else ""
    return f"Classify this {event.kind} task{source}:\n\n{event.text}"


def deadline(event: TaskEvent) -> float | None:
    """The event's own ``deadline_ms``, in seconds."""
    return event.deadline_ms / 1000 if event.deadline_ms is not None else None
