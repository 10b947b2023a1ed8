"""Dead letters: the payload kept (as text, or base64 when not UTF-8), truncated when huge, never a secret."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

from stanchion.contracts import DeadLetter, Usage

MAX_DEAD_PAYLOAD = 16 * 1024


def printable(text: str) -> str:
    """``text`` with anything JSON cannot carry (lone surrogates, from exception texts or ids) backslash-escaped:
    a dead letter must always serialise, or the event it is about would be lost."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True)
class DeadLetters:
    """Builds the dead letters of one handler.

    Args:
        handler: The handler's name, carried by every dead letter.
        redact: Masks secrets in the payload, the reason and every cause.
    """

    handler: str
    redact: Callable[[str], str]

    def build(
        self,
        data: bytes,
        *,
        subject: str,
        error_type: str,
        reason: str,
        event_id: str | None = None,
        delivery: int = 1,
        models_tried: list[str] | None = None,
        attempts: int = 0,
        errors: list[str] | None = None,
        trace_id: str | None = None,
        usage: Usage | None = None,
        cost_usd: float | None = None,
    ) -> DeadLetter:
        kept = data[:MAX_DEAD_PAYLOAD]
        redacted = False
        try:
            text = kept.decode("utf-8")
            payload, encoding = self.redact(text), "utf-8"
            redacted = payload != text
        except UnicodeDecodeError:
            # latin-1 maps bytes 1:1, so it finds a secret inside any bytes; then keep only masked, lossy text.
            as_latin1 = kept.decode("latin-1")
            if self.redact(as_latin1) != as_latin1:
                payload, encoding, redacted = self.redact(kept.decode("utf-8", errors="replace")), "utf-8", True
            else:
                payload, encoding = base64.b64encode(kept).decode("ascii"), "base64"
        return DeadLetter(
            subject=printable(subject),
            handler=self.handler,
            event_id=printable(event_id) if event_id is not None else None,
            reason=printable(self.redact(reason)),
            error_type=error_type,
            payload=payload,
            payload_truncated=len(data) > MAX_DEAD_PAYLOAD,
            payload_redacted=redacted,
            payload_encoding=encoding,
            models_tried=models_tried or [],
            attempts=attempts,
            deliveries=delivery,
            errors=[printable(self.redact(e)) for e in errors or []],
            usage=usage or Usage(),
            cost_usd=cost_usd,
            trace_id=trace_id,
        )
