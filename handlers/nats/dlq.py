"""Dead-letter tools: read the dead-letter stream, and replay dead letters to their original subject."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from stanchion.contracts import DeadLetter

log = structlog.get_logger("stanchion.dlq")


@dataclass(frozen=True)
class StoredDeadLetter:
    seq: int
    dead: DeadLetter


async def dead_letters(js: JetStreamContext, stream: str) -> AsyncIterator[StoredDeadLetter]:
    """Every dead letter in ``stream``, oldest first (messages that are not dead letters are skipped)."""
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq, subject=">", next=True)  # next stored message, any subject
        except NotFoundError:
            return
        if msg.seq is None:
            return
        seq = msg.seq + 1
        try:
            yield StoredDeadLetter(msg.seq, DeadLetter.model_validate_json(msg.data or b""))
        except ValidationError as exc:
            log.warning("not a dead letter; skipped", stream=stream, seq=msg.seq, error=str(exc).splitlines()[0])


def original_payload(dead: DeadLetter) -> bytes:
    """The bytes that were dead-lettered."""
    if dead.payload_encoding == "base64":
        return base64.b64decode(dead.payload)
    return dead.payload.encode("utf-8")


async def replay(js: JetStreamContext, stream: str, letter: StoredDeadLetter) -> None:
    """Publish the original payload to its original subject (JetStream-confirmed), then drop the dead letter.

    The event keeps its id, so the result store and the output stream's dedup still hold.
    """
    if letter.dead.payload_truncated:
        raise ValueError(f"dead letter {letter.seq} kept only the start of its payload; it cannot be replayed")
    if letter.dead.payload_redacted:
        raise ValueError(f"dead letter {letter.seq} had a secret masked in its payload; it cannot be replayed as is")
    await js.publish(letter.dead.subject, original_payload(letter.dead))
    await js.delete_msg(stream, letter.seq)
