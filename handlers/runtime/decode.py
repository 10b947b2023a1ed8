"""Bytes to a typed event, or the reason they are poison: generic over the event model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

EventT = TypeVar("EventT", bound=BaseModel)

MAX_ID_LENGTH = 512
"""Longer ids are poison: an id travels in every envelope, log line and ``Nats-Msg-Id`` header."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

EventId = Callable[[Any], str]
"""Reads an event's id: the dedup key of the result store and of the output stream."""


def id_field(name: str = "id") -> EventId:
    """The event's ``name`` attribute as its id (the default: ``id``)."""

    def read(event: Any) -> str:
        return str(getattr(event, name))

    read.__name__ = f"field {name!r}"
    return read


def validation_problems(exc: ValidationError, most: int = 5) -> str:
    """The first validation errors on one line: ``field.path: message; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:most])


def id_problem(event_id: object) -> str | None:
    """Why ``event_id`` cannot identify an event (``None`` when it can).

    An id must survive a NATS header (``Nats-Msg-Id``) and JSON unchanged: no control characters (CR, LF and NUL
    among them: nats-py turns CR/LF into spaces, so two ids differing only there would collide), no lone
    surrogates, at most ``MAX_ID_LENGTH`` characters. Surrounding whitespace is the event model's business (the
    classifier's ``TaskEvent`` strips it).
    """
    if not isinstance(event_id, str) or not event_id:
        return "the event's id is empty"
    if len(event_id) > MAX_ID_LENGTH:
        return f"the event's id is {len(event_id)} characters long; the limit is {MAX_ID_LENGTH}"
    if (control := _CONTROL.search(event_id)) is not None:
        return f"the event's id holds a control character ({control.group()!a}) at {control.start()}"
    try:
        event_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"the event's id holds a lone surrogate at {exc.start}"
    return None


@dataclass(frozen=True)
class Poison:
    """Why a payload cannot become an event; ``event_id`` when it could still be read."""

    error_type: str
    reason: str
    event_id: str | None = None


@dataclass(frozen=True)
class Decoder(Generic[EventT]):
    """Validates payloads into ``event_type``.

    Args:
        event_type: Any pydantic model.
        event_id: Reads the id of a valid event.
        max_payload_bytes: Larger payloads are poison (``poison.too_large``) before any parsing.
    """

    event_type: type[EventT]
    event_id: EventId
    max_payload_bytes: int

    def __call__(self, data: bytes) -> EventT | Poison:
        if len(data) > self.max_payload_bytes:
            return Poison("poison.too_large", f"payload is {len(data)} bytes; the limit is {self.max_payload_bytes}")
        if not data.strip():
            return Poison("poison.empty", "payload is empty")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Poison("poison.encoding", f"payload is not UTF-8: {exc.reason} at byte {exc.start}")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            return Poison("poison.json", f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        except (RecursionError, ValueError) as exc:  # nesting too deep for the parser, or numbers too long
            reason = (
                "payload is nested too deeply" if isinstance(exc, RecursionError) else f"payload is not JSON: {exc}"
            )
            return Poison("poison.json", reason)
        try:
            event = self.event_type.model_validate(raw)
        except ValidationError as exc:
            problems = validation_problems(exc)
            event_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            event_id = event_id if id_problem(event_id) is None else None  # a dead letter keeps only a usable id
            return Poison("poison.schema", f"payload is not a {self.event_type.__name__}: {problems}", event_id)
        try:
            event_id = self.event_id(event)
        except Exception as exc:
            return Poison("poison.id", f"cannot read the event's id: {type(exc).__name__}: {exc}")
        if (problem := id_problem(event_id)) is not None:
            return Poison("poison.id", problem)
        return event

    def id_of(self, data: bytes) -> str | None:
        """The id of the event in ``data``, ``None`` when it is not a valid event."""
        event = self(data)
        return None if isinstance(event, Poison) else self.event_id(event)
