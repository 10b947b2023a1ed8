"""What the transport must do with one message: publish a result and ack, dead-letter and term, or redeliver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from stanchion.contracts import DeadLetter, ResultEnvelope

OutputT = TypeVar("OutputT", bound=BaseModel)


@dataclass(frozen=True)
class Answered(Generic[OutputT]):
    """Publish the result, then ack.

    ``stored``: answered before, taken from the result store, no model called; ``published``: and its
    publication was confirmed, so only the ack is left to do.
    """

    envelope: ResultEnvelope[OutputT]
    stored: bool = False
    published: bool = False
    data: bytes = b""
    """The envelope as JSON, serialised once (empty: serialise ``envelope``)."""
    digest: str = ""
    """The answered event's content digest (``content_digest``), stored with the published mark."""

    @property
    def body(self) -> bytes:
        return self.data or self.envelope.model_dump_json().encode()


@dataclass(frozen=True)
class DeadLettered:
    """Publish the dead letter, then term."""

    dead: DeadLetter


@dataclass(frozen=True)
class Redeliver:
    """Nothing answered, but later may: nak with ``delay_s``.

    ``pause_s`` is set when the failures said how long to wait (open circuits, ``Retry-After``): the
    transport should stop pulling for that long and try again without spending a delivery.
    """

    delay_s: float
    reason: str
    pause_s: float | None = None
    event_id: str | None = None


Outcome = Answered[Any] | DeadLettered | Redeliver


def outcome_event_id(outcome: Outcome) -> str | None:
    """The id of the event an outcome is about (``None`` for a payload that had none)."""
    if isinstance(outcome, Answered):
        return outcome.envelope.event_id
    if isinstance(outcome, DeadLettered):
        return outcome.dead.event_id
    return outcome.event_id
