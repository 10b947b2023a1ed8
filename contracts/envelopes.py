"""Envelopes published by the service: one result or one dead letter per input event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

RESULT_SCHEMA = "stanchion.result/1"
DEAD_LETTER_SCHEMA = "stanchion.dead-letter/1"

OutputT = TypeVar("OutputT", bound=BaseModel)


class Usage(BaseModel):
    """Tokens spent on one event, summed over every model request made for it."""

    model_config = ConfigDict(extra="ignore")

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            requests=self.requests + other.requests,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens - other.input_tokens,
            output_tokens=self.output_tokens - other.output_tokens,
            requests=self.requests - other.requests,
        )


class Decision(BaseModel):
    """One thing the reliability stack decided while handling an event (route, retry, fallback...)."""

    model_config = ConfigDict(extra="ignore")

    kind: str = Field(description="route, attempt, retry, breaker, fallback, timeout, degraded, ...")
    model: str | None = Field(default=None, description="The candidate the decision is about.")
    detail: str = ""
    at_ms: float = Field(default=0.0, description="Milliseconds since the event entered the stack.")
    data: dict[str, Any] = Field(default_factory=dict)


class ResultEnvelope(BaseModel, Generic[OutputT]):
    """The answer to one event, published to the output subject."""

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal["stanchion.result/1"] = "stanchion.result/1"
    event_id: str
    handler: str | None = Field(default=None, description="The handler that answered (its declared name).")
    result: OutputT
    model: str = Field(description='The candidate that served the event; "heuristic" when degraded.')
    degraded: bool = False
    attempts: int = Field(ge=0, description="Model requests attempted for this event, all candidates.")
    latency_ms: float
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float | None = Field(default=None, description="Null when the price is unknown.")
    trace_id: str | None = None
    decisions: list[Decision] = Field(default_factory=list)
    produced_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class DeadLetter(BaseModel):
    """An event the service could not answer, with everything needed to understand and replay it."""

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal["stanchion.dead-letter/1"] = "stanchion.dead-letter/1"
    subject: str = Field(description="The subject the event arrived on; replay publishes back to it.")
    handler: str | None = Field(default=None, description="The handler the event was for (its declared name).")
    event_id: str | None = Field(default=None, description="Set when the id could be read.")
    reason: str = Field(description="Human-readable reason.")
    error_type: str = Field(description="poison.json, poison.schema, poison.too_large, exhausted, ...")
    payload: str = Field(description="The original bytes as text (truncated when huge).")
    payload_truncated: bool = False
    payload_redacted: bool = Field(default=False, description="A secret was masked in the payload; not replayable.")
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    models_tried: list[str] = Field(default_factory=list)
    attempts: int = 0
    deliveries: int = 1
    errors: list[str] = Field(default_factory=list, description="Every cause, one line each.")
    usage: Usage = Field(default_factory=Usage, description="Tokens spent on the event, every attempt, failed or not.")
    cost_usd: float | None = Field(default=None, description="What those tokens cost; null when the price is unknown.")
    trace_id: str | None = None
    dead_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
