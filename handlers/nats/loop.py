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
PULL_TIMEOUT_S = 1.0
"""How long one pull request of the subscriber waits (and lives on the server)."""
SETTLE_HOLD_S = 2 * PULL_TIMEOUT_S + 0.5
"""At shutdown, how long settling waits: the fetch running when shutdown began, and the one after it, expire."""
DRAIN_WAIT_S = PULL_TIMEOUT_S + 0.2
"""At shutdown, how long the subscriber keeps consuming: FastStream drops what a fetch returns once it stopped."""
HAND_BACK_DELAY_S = 2.0
"""Delay of a nak at shutdown: longer than a pull (1 s), so that the stopping process's last fetch does not take the
message again only to drop it when its subscriber stops; a restarted (or another) replica gets it then."""

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


Repair = Callable[[str], Awaitable[None]]
"""Recreates a missing stream, as at start-up: called with ``"results"`` or ``"dead_letters"``."""

FAULT_LOG_INTERVAL_S = 60.0


@dataclass
class MessageLoop:
    """Handles one delivery of one handler's message, start to finish; and, on shutdown, hands messages back.

    Every message fetched enters here at once (the subscriber's workers cover every unacked message), and waits at
    the loop's own gate of ``max_in_flight``: so on shutdown the waiting ones are nak'ed at once, and the ones in
    flight are cancelled and nak'ed before the grace period ends, while the connection is still up.

    Args:
        runtime: The handler without the transport.
        drain: Naks the messages the client buffered for this consumer but nobody fetched; returns how many.
        publish_result: Publishes a result envelope (confirmed).
        publish_dead: Publishes a dead letter (confirmed).
        ack_wait_s: The durable's ack wait: heartbeats every third of it.
        max_pause_s: Longest a message is held for a pause before it is nak'ed instead.
        max_in_flight: Messages handled at once; the others wait, kept alive.
        repair: Recreates a missing output or dead-letter stream (``None``: operator-managed streams).
        clock: Time source (pauses and publish retries sleep on it).
    """

    runtime: HandlerRuntime[Any, Any]
    publish_result: Publish
    publish_dead: Publish
    ack_wait_s: float
    max_pause_s: float
    max_in_flight: int = 16
    repair: Repair | None = None
    drain: Callable[[], Awaitable[int]] | None = None
    """Hands back what the client buffered but nobody fetched (called while stopping, after each message)."""
    clock: Clock = SYSTEM_CLOCK

    def __post_init__(self) -> None:
        self.pause = Pause(self.ack_wait_s, self.clock)
        self.gate = asyncio.Semaphore(self.max_in_flight)
        self.stopping = False
        self._stopped: asyncio.Event | None = None
        self._work: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[Any]] = set()
        self.waiting = 0
        self._release_at = 0.0
        """Messages waiting at the gate."""
        self._fault_logged_at = -FAULT_LOG_INTERVAL_S

    def stop(self, grace_s: float) -> None:
        """Shutdown began: hand back every waiting message now, and cancel (and hand back) what is still in flight
        shortly before ``grace_s`` runs out."""
        if self.stopping:
            return
        self.stopping = True
        # Settle nothing until the last pull request expired (see _hold), within the first half of the grace.
        self._release_at = self.clock.now() + min(SETTLE_HOLD_S, grace_s / 2)
        log.info("stopping: handing back what is held", waiting=self.waiting, in_flight=len(self._work))
        if self._stopped is not None:
            self._stopped.set()
        margin = min(1.0, grace_s * 0.2)
        asyncio.get_running_loop().call_later(max(grace_s - margin, 0.0), self._cancel_work)

    def _cancel_work(self) -> None:
        for task in list(self._work - self._settling):  # one already settling finishes that, uninterrupted
            task.cancel()

    async def __call__(self, msg: Message, data: bytes, delivery: int, subject: str) -> None:
        async with keep_alive(msg, self.ack_wait_s):
            if self.stopping or not await self._enter():
                await self._hand_back(msg)
                await self._drained()
                return
            try:
                work = asyncio.create_task(self._process(msg, data, delivery, subject))
                self._work.add(work)
                work.add_done_callback(self._work.discard)
                try:
                    await work
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # cancelled from outside (FastStream's own deadline): _process has handed it back
                    # Cancelled by stop(): handed back, a normal end.
            finally:
                self.gate.release()
        await self._drained()

    async def _drained(self) -> None:
        """While stopping: hand back what the client buffered but nobody will fetch (see ``_hold``)."""
        if self.stopping and self.drain is not None:
            with contextlib.suppress(Exception):
                if drained := await self.drain():
                    log.info("handed back at shutdown", buffered=drained)

    async def _enter(self) -> bool:
        """Wait for a free slot; ``False`` when shutdown began meanwhile."""
        if not self.gate.locked():
            await self.gate.acquire()
            return True
        if self._stopped is None:
            self._stopped = asyncio.Event()
        acquire = asyncio.ensure_future(self.gate.acquire())
        stopped = asyncio.ensure_future(self._stopped.wait())
        self.waiting += 1
        try:
            await asyncio.wait((acquire, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            stopped.cancel()
        if self.stopping:
            if acquire.done() and not acquire.cancelled():
                self.gate.release()
            else:
                acquire.cancel()
            return False
        return True

    async def _hand_back(self, msg: Message) -> None:
        await self._hold()
        with contextlib.suppress(Exception):
            await msg.nack(delay=HAND_BACK_DELAY_S)
        log.info("handed back at shutdown")

    async def _process(self, msg: Message, data: bytes, delivery: int, subject: str) -> None:
        runtime = self.runtime
        outcome: Outcome | None = None
        published = False
        try:
            await self.pause.wait(msg)
            held_since = self.clock.now()
            outcome = await runtime.handle(data, subject=subject, headers=msg.headers, delivery=delivery)
            structlog.contextvars.bind_contextvars(event_id=outcome_event_id(outcome))
            while (
                isinstance(outcome, Redeliver)
                and outcome.pause_s is not None
                and self.clock.now() - held_since + outcome.pause_s <= self.max_pause_s
                and not self.stopping
            ):
                # The failures said how long to wait: hold the message and stop pulling, don't spend a delivery.
                # (At least MIN_PAUSE_S: a half-open breaker with its probe in flight says "now".) The retry
                # after the pause makes one attempt per candidate: holding must not multiply attempts.
                self.pause.pause(max(outcome.pause_s, MIN_PAUSE_S))
                await self.pause.wait(msg)
                outcome = await runtime.handle(
                    data, subject=subject, headers=msg.headers, delivery=delivery, retry=False
                )
            await self._publish(outcome, msg)
            published = True
            await self._finish(outcome, msg)
        except asyncio.CancelledError:
            if not published:
                # Shutdown: hand the message back now rather than after the ack wait.
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nack(delay=HAND_BACK_DELAY_S if self.stopping else None))
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
        if self.stopping and not published:
            await self._hand_back(msg)  # shutdown ended the wait for a publish: back to the stream, not lost
            return
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

    async def _publish(self, outcome: Outcome, msg: Message) -> None:
        """Publish the result or dead letter and wait for JetStream's confirmation (nothing to publish for a nak).

        Until the stream confirms, the message is held (its heartbeats go on), spending no delivery: a missing
        stream is recreated and the publish tried again; publishing is idempotent (``Nats-Msg-Id``). Only shutdown
        ends the wait, handing the message back.
        """
        failures = 0
        while True:
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
            except Exception as exc:
                if self.stopping:
                    raise
                failures += 1
                kind = "results" if isinstance(outcome, Answered) else "dead_letters"
                self._fault(f"publishing {kind} failed; holding the message and trying again", exc, failures)
                # A publish to a deleted stream times out (FastStream) or finds no stream (nats-py): recreate it if
                # it is gone (the repair looks before it creates).
                if self.repair is not None:
                    try:
                        await self.repair(kind)
                    except Exception as repair_failed:
                        self._fault("recreating the stream failed", repair_failed, failures)
                await self.clock.sleep(min(0.2 * failures, 5.0))

    def _fault(self, message: str, exc: Exception, failures: int) -> None:
        """Log an infrastructure fault at error level, at most once a minute."""
        now = self.clock.now()
        if now - self._fault_logged_at >= FAULT_LOG_INTERVAL_S:
            self._fault_logged_at = now
            log.error(message, error=f"{type(exc).__name__}: {exc}", failures=failures)

    async def _dead_letter(self, dead: DeadLetter, msg: Message) -> None:
        """Publish a dead letter (confirmed by the dead-letter stream); the caller terms the message."""
        msg_id = f"dead:{dead.event_id or 'unknown'}:{stream_sequence(msg)}"
        await self.publish_dead(
            dead.model_dump_json().encode(), {"Nats-Msg-Id": msg_id, "content-type": "application/json"}
        )

    async def _hold(self) -> None:
        """While stopping, settle nothing before the subscriber's last pull request has expired.

        Every ack, nak or term frees a slot of the durable's ``max_ack_pending``, and the server fills free slots
        into pull requests still open. After shutdown began nobody fetches them any more, so a message delivered
        then would sit in the client's buffer, unanswered until its ack wait. Holding every settlement until the
        last request expired (kept alive meanwhile) leaves nothing to deliver into.
        """
        if not self.stopping:
            return
        if (task := asyncio.current_task()) is not None:
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        if (left := self._release_at - self.clock.now()) > 0:
            await self.clock.sleep(left)

    async def _finish(self, outcome: Outcome, msg: Message) -> None:
        """Ack an answer, term a dead letter, nak a redelivery."""
        await self._hold()
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
