"""The input event and the agent's typed output for the classification use case."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TASK_EVENT_SCHEMA = "stanchion.task-event/1"
MAX_TEXT_LENGTH = 16_000

Category = Literal["bug", "feature", "question", "other"]


class TaskEvent(BaseModel):
    """A task or message to classify, as published to ``tasks.classify``."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    schema_version: Literal["stanchion.task-event/1"] = "stanchion.task-event/1"
    id: str = Field(min_length=1, max_length=200, description="Unique event id; the dedup key.")
    text: str = Field(min_length=1, max_length=MAX_TEXT_LENGTH, description="The text to classify.")
    source: str | None = Field(default=None, max_length=200, description="Where the event came from.")
    kind: str = Field(
        default="simple",
        max_length=50,
        description='Routing hint: "simple" events go to the fast model, "complex" to the strong one.',
    )
    created_at: datetime | None = None
    deadline_ms: int | None = Field(
        default=None,
        gt=0,
        description="Tighter per-event deadline in milliseconds; the service's own deadline still applies.",
    )


class TaskClassification(BaseModel):
    """The classifier's typed answer."""

    model_config = ConfigDict(extra="forbid")

    category: Category = Field(description="bug, feature, question or other.")
    priority: int = Field(ge=1, le=5, description="1 (lowest) to 5 (most urgent).")
    confidence: float = Field(ge=0.0, le=1.0, description="How sure the classifier is, 0 to 1.")
    summary: str = Field(max_length=280, description="One short sentence saying what the task is about.")
