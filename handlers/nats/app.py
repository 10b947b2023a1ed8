"""The FastStream app: JetStream in, the classifier service, results and dead letters out.

Runs under ``stanchion run`` (which starts an embedded nats-server when ``NATS_URL`` is unset),
or under FastStream's own CLI: ``faststream run handlers.app:app`` and
``faststream docs gen handlers.app:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import structlog
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.specification import AsyncAPI
from nats.errors import NotJSMessageError
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType

from stanchion.contracts import DeadLetter, ResultEnvelope, TaskClassification, TaskEvent
from stanchion.handlers.nats.connection import broker_security
from stanchion.handlers.observability.report import register as register_stats
from stanchion.handlers.observability.telemetry import TelemetryMiddleware
from stanchion.handlers.runtime.results import KeyValueResultStore
from stanchion.handlers.runtime.service import (
    Answered,
    ClassifierService,
    DeadLettered,
    Outcome,
    Redeliver,
    outcome_event_id,
)
from stanchion.handlers.settings import Settings
from stanchion.middleware import SYSTEM_CLOCK, Clock

log = structlog.get_logger("stanchion.app")

DEFAULT_URL = "nats://127.0.0.1:4222"
MIN_PAUSE_S = 0.2


async def raw_body(msg: NatsMessage) -> bytes:
    """Hand the handler the bytes as they arrived: the service validates them itself."""
    return msg.body


def delivery_count(msg: NatsMessage) -> int:
    try:
        return int(msg.raw_message.metadata.num_delivered)
    except NotJSMessageError:  # a core NATS message (e.g. under TestNatsBroker): its first and only delivery
        return 1


def create_broker(settings: Settings, url: str | None = None) -> NatsBroker:
    """The broker: reconnects forever after a server restart; auth and TLS from the settings."""
    return NatsBroker(
        url or settings.nats_url or DEFAULT_URL,
        name="stanchion",
        # Messaging spans, and W3C trace context carried in message headers (uses the global tracer provider).
        middlewares=[TelemetryMiddleware()] if settings.otel_endpoint else [],
        security=broker_security(settings),
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=settings.shutdown_grace_s,
        logger=logging.getLogger("stanchion.faststream"),
        log_level=logging.DEBUG,
    )


class Pause:
    """Backpressure shared by every handler of one app: while paused, nobody starts work or asks for more.

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

    async def wait(self, msg: NatsMessage) -> None:
        while (left := self.until - self.clock.now()) > 0:
            await msg.in_progress()
            await self.clock.sleep(min(left, self.heartbeat_s))


def pull_batch(settings: Settings) -> int:
    """Messages asked for by one pull request."""
    return min(settings.max_in_flight, 8)


def max_ack_pending(settings: Settings) -> int:
    """Unacked messages the durable allows: every worker busy and one pull batch waiting for them, per replica.

    A pull request keeps the messages it got until its batch is full; counted against a limit of just the
    workers, they left about half a batch of workers idle (bench: 4 % more events/s on a 200 ms provider at 64 in
    flight with the extra batch). A waiting message is not yet kept alive: it waits for the first worker to finish.
    """
    return (settings.max_in_flight + pull_batch(settings)) * settings.replicas


def _output_stream(name: str, subject: str, settings: Settings) -> JStream:
    """A file-backed stream that drops a second message with the same Nats-Msg-Id within the dedup window."""
    return JStream(name, subjects=[subject], duplicate_window=settings.dedup_window_s, storage=StorageType.FILE)


def create_app(
    settings: Settings,
    service: ClassifierService,
    *,
    url: str | None = None,
    broker: NatsBroker | None = None,
) -> FastStream:
    """Wire the service into a FastStream app on ``url`` (default ``settings.nats_url``)."""
    broker = broker or create_broker(settings, url)
    if not service.results_given:
        # Replicas share answered results through a KV bucket; the connection opens later, hence the lambda.
        state = broker.config.connection_state
        service.results = KeyValueResultStore(
            lambda: state.connection, settings.result_bucket, settings.result_ttl_s, js=lambda: state.stream
        )
    results = broker.publisher(
        settings.output_subject,
        stream=_output_stream(settings.output_stream, settings.output_subject, settings),
        schema=ResultEnvelope[TaskClassification],
        title="results",
        description="One result envelope per event. Nats-Msg-Id is the event id, so duplicates are dropped.",
    )
    dead_letters = broker.publisher(
        settings.dlq_subject,
        stream=_output_stream(settings.dlq_stream, settings.dlq_subject, settings),
        schema=DeadLetter,
        title="dead-letters",
        description="Events the service could not answer, with their reason and payload.",
    )
    pause = Pause(settings.ack_wait_s, service.clock)

    consumer_config = ConsumerConfig(
        durable_name=settings.durable,
        max_deliver=settings.max_deliver,
        ack_wait=settings.ack_wait_s,
        max_ack_pending=max_ack_pending(settings),
    )

    @broker.subscriber(
        settings.input_subject,
        stream=JStream(
            settings.input_stream,
            subjects=[settings.input_subject],
            storage=StorageType.FILE,
            max_age=settings.input_max_age_s,
            retention=RetentionPolicy(settings.input_retention),
        ),
        durable=settings.durable,
        pull_sub=PullSub(batch_size=pull_batch(settings), timeout=1.0),
        config=consumer_config,
        max_workers=settings.max_in_flight,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_body,
        title="tasks",
        description="TaskEvents to classify. Anything that is not a valid TaskEvent becomes a dead letter.",
    )
    async def classify(body: TaskEvent | bytes) -> None:
        # The message from FastStream's context, not as a `msg: NatsMessage` parameter: FastDepends resolves such a
        # parameter with a synchronous function it runs in a worker thread, a thread hop for every message.
        msg: NatsMessage = broker.context.get_local("message")
        data = body if isinstance(body, bytes) else body.model_dump_json().encode()
        delivery = delivery_count(msg)
        subject = msg.raw_message.subject or settings.input_subject
        # Every line logged for this message says which subject (and, once known, which event) it is about.
        bound = structlog.contextvars.bind_contextvars(subject=subject, event_id=None)
        try:
            await _handle_message(msg, data, delivery, subject)
        finally:
            structlog.contextvars.reset_contextvars(**bound)

    async def _handle_message(msg: NatsMessage, data: bytes, delivery: int, subject: str) -> None:
        outcome: Outcome | None = None
        published = False
        try:
            async with keep_alive(msg, settings.ack_wait_s):
                await pause.wait(msg)
                held_since = service.clock.now()
                outcome = await service.handle(data, subject=subject, headers=msg.headers, delivery=delivery)
                structlog.contextvars.bind_contextvars(event_id=outcome_event_id(outcome))
                while (
                    isinstance(outcome, Redeliver)
                    and outcome.pause_s is not None
                    and service.clock.now() - held_since + outcome.pause_s <= settings.max_pause_s
                ):
                    # The failures said how long to wait: hold the message and stop pulling, don't spend a delivery.
                    # (At least MIN_PAUSE_S: a half-open breaker with its probe in flight says "now".) The retry
                    # after the pause makes one attempt per candidate: holding must not multiply attempts.
                    pause.pause(max(outcome.pause_s, MIN_PAUSE_S))
                    await pause.wait(msg)
                    outcome = await service.handle(
                        data, subject=subject, headers=msg.headers, delivery=delivery, retry=False
                    )
                last = delivery >= settings.max_deliver
                # Publishing is idempotent (Nats-Msg-Id): on the last delivery keep trying rather than lose it.
                await _publish(outcome, service, results, dead_letters, msg, tries=5 if last else 1)
                published = True
                await _finish(outcome, msg)
        except asyncio.CancelledError:
            if not published:
                # Shutdown grace period ran out: hand the message back now rather than after the ack wait.
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nack())
            raise
        except Exception as exc:
            log.exception("handling failed", delivery=delivery, published=published)
            if published:
                return  # the outcome is out and confirmed; only the ack was lost: a redelivery will just ack
            if delivery < settings.max_deliver:
                await msg.nack(delay=min(2.0**delivery, 30.0))
                return
            if isinstance(outcome, Answered | DeadLettered):
                log.error("could not publish the outcome of the last delivery", event_id=_event_id(service, data))
                return
            # The service itself failed on the last delivery: dead-letter the event rather than let it go.
            dead = service.dead_letter(
                data,
                subject=subject,
                error_type="internal",
                reason=f"handler failed: {type(exc).__name__}",
                event_id=_event_id(service, data),
                delivery=delivery,
                errors=[f"{type(exc).__name__}: {exc}"],
            )
            try:
                await _dead_letter(dead_letters, dead, msg)
                await msg.reject()
            except Exception:
                log.exception("dead-lettering failed; the message stays unacked")

    async def reconcile_consumer() -> None:
        """An existing durable keeps its old config when FastStream attaches to it: bring it up to the settings."""
        js = broker.config.connection_state.stream
        info = await js.consumer_info(settings.input_stream, settings.durable)
        wanted = (settings.max_deliver, settings.ack_wait_s, max_ack_pending(settings))
        have = (info.config.max_deliver, info.config.ack_wait, info.config.max_ack_pending)
        if have != wanted:
            config = dataclasses.replace(
                info.config, max_deliver=wanted[0], ack_wait=wanted[1], max_ack_pending=wanted[2]
            )
            await js.add_consumer(settings.input_stream, config)  # create-or-update, in place
            log.warning("updated the durable consumer to the settings", durable=settings.durable, had=have)

    stats_services: list[Any] = []

    async def announce() -> None:
        """Answer `$SRV.STATS.stanchion` (and `stanchion report`) with this process's statistics."""
        nc = broker.config.connection_state.connection
        stats_services.append(
            await register_stats(nc, service.stats, durable=settings.durable, input_subject=settings.input_subject)
        )

    async def withdraw() -> None:
        for stats_service in stats_services:
            with contextlib.suppress(Exception):
                await stats_service.stop()
        stats_services.clear()

    return FastStream(
        broker,
        specification=AsyncAPI(
            title="stanchion",
            version="0.1.0",
            description="Classifies TaskEvents with typed LLM agents behind a reliability stack.",
        ),
        after_startup=[reconcile_consumer, announce],
        on_shutdown=[withdraw],
        # After the broker stopped: the handlers still finishing during the grace period need the clients.
        after_shutdown=[service.aclose],
    )


@contextlib.asynccontextmanager
async def keep_alive(msg: NatsMessage, ack_wait_s: float) -> AsyncIterator[None]:
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


async def _publish(
    outcome: Outcome, service: ClassifierService, results: Any, dead_letters: Any, msg: NatsMessage, *, tries: int
) -> None:
    """Publish the result or dead letter and wait for JetStream's confirmation (nothing to publish for a nak)."""
    for attempt in range(1, tries + 1):
        try:
            if isinstance(outcome, Answered) and not outcome.published:
                envelope, body = outcome.envelope, outcome.body
                await results.publish(
                    body, headers={"Nats-Msg-Id": envelope.event_id, "content-type": "application/json"}
                )
                with contextlib.suppress(Exception):  # if this is lost, a redelivery republishes (dedup drops it)
                    await service.published(envelope, body)
            elif isinstance(outcome, DeadLettered):
                await _dead_letter(dead_letters, outcome.dead, msg)
            return
        except Exception:
            if attempt == tries:
                raise
            log.warning("publish failed; trying again", attempt=attempt)
            await asyncio.sleep(0.5 * attempt)


async def _finish(outcome: Outcome, msg: NatsMessage) -> None:
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


def _event_id(service: ClassifierService, data: bytes) -> str | None:
    event = service.validate(data, subject="")
    return event.id if isinstance(event, TaskEvent) else None


async def _dead_letter(publisher: Any, dead: DeadLetter, msg: NatsMessage) -> None:
    """Publish a dead letter (confirmed by the dead-letter stream); the caller terms the message."""
    seq = "x"
    with contextlib.suppress(Exception):
        seq = str(msg.raw_message.metadata.sequence.stream)
    await publisher.publish(
        dead.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"dead:{dead.event_id or 'unknown'}:{seq}", "content-type": "application/json"},
    )


def tune_gc(threshold: int) -> None:
    """Tune the cyclic garbage collector for a long-running service, once start-up is over.

    Everything alive after start-up (imported modules, schemas, clients) is frozen out of later collections,
    and the young generation is collected every ``threshold`` allocations instead of Python's 700: with spans
    waiting in the exporter's batch, the default made tracing cost about 40 % more CPU per event (bench/).
    ``0`` leaves the collector as Python set it.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)


def _module_app() -> FastStream:
    """The app for ``faststream run handlers.app:app``: settings from the environment.

    ``NATS_URL`` unset: an embedded nats-server is started before the broker connects, and stopped after.
    """
    from stanchion.handlers.errors import ConfigError
    from stanchion.handlers.nats.embedded import EmbeddedNats
    from stanchion.handlers.observability.logs import configure_logging
    from stanchion.handlers.observability.telemetry import configure_telemetry
    from stanchion.handlers.policy import resolve_policy
    from stanchion.handlers.settings import load_settings

    try:
        settings = load_settings()
        policy = resolve_policy(settings)
        telemetry = configure_telemetry(settings)
        service = ClassifierService(settings, policy)
        broker = create_broker(settings)
        application = create_app(settings, service, broker=broker)
    except ConfigError as exc:
        raise SystemExit(f"stanchion: configuration error: {exc}") from None
    embedded: list[EmbeddedNats] = []

    @application.on_startup
    async def start_embedded() -> None:
        # async, so it runs on the event loop's thread: the server's parent-death signal is tied to that thread.
        configure_logging(settings.log_level, settings.log_format, service.redact.secrets)
        if settings.nats_url is None:
            server = EmbeddedNats(settings.nats_server_bin, settings.nats_store_dir)
            url = server.start()
            embedded.append(server)
            # The broker was built before the server existed; point its (not yet opened) connection at it.
            broker._connection_kwargs["servers"] = [url]
            log.info("embedded nats-server started", url=url, pid=server.process.pid if server.process else None)

    @application.after_startup
    async def tuned() -> None:
        tune_gc(settings.gc_threshold)

    @application.after_shutdown
    def stop_embedded() -> None:
        for server in embedded:
            server.stop()
        if telemetry is not None:
            telemetry.shutdown()

    return application


def __getattr__(name: str) -> Any:
    # `faststream run handlers.app:app` reads `app`: build it then, not whenever this module is imported.
    if name == "app":
        application = _module_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
