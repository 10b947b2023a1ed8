"""The message loop of one handler: hold, heartbeat, handle, publish, then ack, term or nak.

Transport-agnostic enough to test with a fake message: it needs a message with ``ack``/``nack``/``reject``/
``in_progress`` and ``raw_message.metadata``, and two publish functions (the result, the dead letter) that
return once JetStream confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from stanchion.contracts import DeadLetter
from stanchion.handlers.runtime.handler import HandlerRuntime
from stanchion.handlers.runtime.outcome import Answered, DeadLettered, Outcome, Redeliver, outcome_event_id
from stanchion.middleware import SYSTEM_CLOCK, Clock

log = structlog.get_logger("stanchion.app")

MIN_PAUSE_S = 0.2
PUBLISH_TRIES_ON_LAST_DELIVERY = 5

Publish = Callable[[bytes, Mapping[str, str]], Awaitable[Any]]
"""Publishes a body with headers to a JetStream stream and returns once the stream confirmed it."""


class Message(Protocol):
    """What the loop needs of a FastStream ``NatsMessage``."""

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def raw_message(self) -> Any: ...

    async def ack(self) -> None: ...

    async def nack(self, delay: float | None = None) -> None: ...

    async def reject(self) -> None: ...

    async def in_progress(self) -> None: ...


class Pause:
    """Backpressure of one handler: while paused, none of its workers starts work or asks for more.

    Held messages get ``in_progress`` so their ack wait restarts: waiting costs no delivery.
    """

    def __init__(self, ack_wait_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.until = 0.0
        self.clock = clock
        self.heartbeat_s = max(ack_wait_s / 3, 0.05)

    def pause(self, seconds: float) -> None:
        if seconds > 0:
            until = self.clock.now() + seconds
            if until > self.until:
                log.warning("pausing consumption", seconds=round(seconds, 3))
                self.until = until

    async def wait(self, msg: Message) -> None:
        while (left := self.until - self.clock.now()) > 0:
            await msg.in_progress()
            await self.clock.sleep(min(left, self.heartbeat_s))


@contextlib.asynccontextmanager
async def keep_alive(msg: Message, ack_wait_s: float) -> AsyncIterator[None]:
    """Tell JetStream the message is in progress every third of the ack wait, for as long as it is handled.

    A timer, not a task per message: most messages are done long before the first beat is due.
    """
    loop = asyncio.get_running_loop()
    interval = ack_wait_s / 3
    beats: set[asyncio.Task[None]] = set()
    timer: asyncio.TimerHandle | None = None

    async def in_progress() -> None:
        with contextlib.suppress(Exception):
            await msg.in_progress()

    def beat() -> None:
        nonlocal timer
        task = loop.create_task(in_progress())
        beats.add(task)
        task.add_done_callback(beats.discard)
        timer = loop.call_later(interval, beat)

    timer = loop.call_later(interval, beat)
    try:
        yield
    finally:
        timer.cancel()  # the latest one: each beat schedules the next
        for task in list(beats):
            task.cancel()


def stream_sequence(msg: Message) -> str:
    """The message's sequence in its stream ("x" when it has none, e.g. a core NATS message)."""
    with contextlib.suppress(Exception):
        return str(msg.raw_message.metadata.sequence.stream)
    return "x"


@dataclass
class MessageLoop:
    """Handles one delivery of one handler's message, start to finish.

    Args:
        runtime: The handler without the transport.
        publish_result: Publishes a result envelope (confirmed).
        publish_dead: Publishes a dead letter (confirmed).
        ack_wait_s: The durable's ack wait: heartbeats every third of it.
        max_pause_s: Longest a message is held for a pause before it is nak'ed instead.
        clock: Time source (pauses and publish retries sleep on it).
    """

    runtime: HandlerRuntime[Any, Any]
    publish_result: Publish
    publish_dead: Publish
    ack_wait_s: float
    max_pause_s: float
    clock: Clock = SYSTEM_CLOCK

    def __post_init__(self) -> None:
        self.pause = Pause(self.ack_wait_s, self.clock)

    async def __call__(self, msg: Message, data: bytes, delivery: int, subject: str) -> None:
        runtime = self.runtime
        outcome: Outcome | None = None
        published = False
        try:
            async with keep_alive(msg, self.ack_wait_s):
                await self.pause.wait(msg)
                held_since = self.clock.now()
                outcome = await runtime.handle(data, subject=subject, headers=msg.headers, delivery=delivery)
                structlog.contextvars.bind_contextvars(event_id=outcome_event_id(outcome))
                while (
                    isinstance(outcome, Redeliver)
                    and outcome.pause_s is not None
                    and self.clock.now() - held_since + outcome.pause_s <= self.max_pause_s
                ):
                    # The failures said how long to wait: hold the message and stop pulling, don't spend a delivery.
                    # (At least MIN_PAUSE_S: a half-open breaker with its probe in flight says "now".) The retry
                    # after the pause makes one attempt per candidate: holding must not multiply attempts.
                    self.pause.pause(max(outcome.pause_s, MIN_PAUSE_S))
                    await self.pause.wait(msg)
                    outcome = await runtime.handle(
                        data, subject=subject, headers=msg.headers, delivery=delivery, retry=False
                    )
                last = runtime.redelivery.last(delivery)
                # Publishing is idempotent (Nats-Msg-Id): on the last delivery keep trying rather than lose it.
                await self._publish(outcome, msg, tries=PUBLISH_TRIES_ON_LAST_DELIVERY if last else 1)
                published = True
                await self._finish(outcome, msg)
        except asyncio.CancelledError:
            if not published:
                # Shutdown grace period ran out: hand the message back now rather than after the ack wait.
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nack())
            raise
        except Exception as exc:
            await self._failed(exc, msg, data, delivery, subject, outcome, published)

    async def _failed(
        self,
        exc: Exception,
        msg: Message,
        data: bytes,
        delivery: int,
        subject: str,
        outcome: Outcome | None,
        published: bool,
    ) -> None:
        runtime = self.runtime
        log.exception("handling failed", delivery=delivery, published=published)
        if published:
            return  # the outcome is out and confirmed; only the ack was lost: a redelivery will just ack
        if not runtime.redelivery.last(delivery):
            await msg.nack(delay=runtime.redelivery.delay(delivery))
            return
        event_id = runtime.decoder.id_of(data)
        if isinstance(outcome, Answered | DeadLettered):
            log.error("could not publish the outcome of the last delivery", event_id=event_id)
            return
        # The handler itself failed on the last delivery: dead-letter the event rather than let it go.
        dead = runtime.dead_letter(
            data,
            subject=subject,
            error_type="internal",
            reason=f"handler failed: {type(exc).__name__}",
            event_id=event_id,
            delivery=delivery,
            errors=[f"{type(exc).__name__}: {exc}"],
        )
        try:
            await self._dead_letter(dead, msg)
            await msg.reject()
        except Exception:
            log.exception("dead-lettering failed; the message stays unacked")

    async def _publish(self, outcome: Outcome, msg: Message, *, tries: int) -> None:
        """Publish the result or dead letter and wait for JetStream's confirmation (nothing to publish for a nak)."""
        for attempt in range(1, tries + 1):
            try:
                if isinstance(outcome, Answered) and not outcome.published:
                    envelope, body = outcome.envelope, outcome.body
                    await self.publish_result(
                        body, {"Nats-Msg-Id": envelope.event_id, "content-type": "application/json"}
                    )
                    with contextlib.suppress(Exception):  # if this is lost, a redelivery republishes (dedup drops it)
                        await self.runtime.published(envelope, body, outcome.digest)
                elif isinstance(outcome, DeadLettered):
                    await self._dead_letter(outcome.dead, msg)
                return
            except Exception:
                if attempt == tries:
                    raise
                log.warning("publish failed; trying again", attempt=attempt)
                await self.clock.sleep(0.5 * attempt)

    async def _dead_letter(self, dead: DeadLetter, msg: Message) -> None:
        """Publish a dead letter (confirmed by the dead-letter stream); the caller terms the message."""
        msg_id = f"dead:{dead.event_id or 'unknown'}:{stream_sequence(msg)}"
        await self.publish_dead(
            dead.model_dump_json().encode(), {"Nats-Msg-Id": msg_id, "content-type": "application/json"}
        )

    async def _finish(self, outcome: Outcome, msg: Message) -> None:
        """Ack an answer, term a dead letter, nak a redelivery."""
        if isinstance(outcome, Answered):
            await msg.ack()
            envelope = outcome.envelope
            log.info(
                "answered",
                event_id=envelope.event_id,
                model=envelope.model,
                degraded=envelope.degraded,
                attempts=envelope.attempts,
                latency_ms=envelope.latency_ms,
                stored=outcome.stored,
            )
        elif isinstance(outcome, DeadLettered):
            await msg.reject()
            log.warning(
                "dead-lettered",
                event_id=outcome.dead.event_id,
                error_type=outcome.dead.error_type,
                reason=outcome.dead.reason,
            )
        else:
            await msg.nack(delay=outcome.delay_s)
