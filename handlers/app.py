"""The FastStream app: JetStream in, the classifier service, results and dead letters out.

Runs under ``stanchion run`` (which starts an embedded nats-server when ``NATS_URL`` is unset),
or under FastStream's own CLI: ``faststream run handlers.app:app`` and
``faststream docs gen handlers.app:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import structlog
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.specification import AsyncAPI
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType

from contracts import DeadLetter, ResultEnvelope, TaskClassification, TaskEvent
from handlers.connection import broker_security
from handlers.results import InMemoryResultStore, KeyValueResultStore
from handlers.service import Answered, ClassifierService, DeadLettered, Outcome, Redeliver
from handlers.settings import Settings
from middleware import SYSTEM_CLOCK, Clock

log = structlog.get_logger("stanchion.app")

DEFAULT_URL = "nats://127.0.0.1:4222"
MIN_PAUSE_S = 0.2


async def raw_body(msg: NatsMessage) -> bytes:
    """Hand the handler the bytes as they arrived: the service validates them itself."""
    return msg.body


def delivery_count(msg: NatsMessage) -> int:
    with contextlib.suppress(Exception):  # not a JetStream message (e.g. under TestNatsBroker)
        return int(msg.raw_message.metadata.num_delivered)
    return 1


def create_broker(settings: Settings, url: str | None = None) -> NatsBroker:
    """The broker: reconnects forever after a server restart; auth and TLS from the settings."""
    return NatsBroker(
        url or settings.nats_url or DEFAULT_URL,
        name="stanchion",
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
    if isinstance(service.results, InMemoryResultStore):
        # Replicas share answered results through a KV bucket; the connection opens later, hence the lambda.
        service.results = KeyValueResultStore(
            lambda: broker.config.connection_state.stream, settings.result_bucket, settings.result_ttl_s
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

    @broker.subscriber(
        settings.input_subject,
        stream=JStream(
            settings.input_stream,
            subjects=[settings.input_subject],
            storage=StorageType.FILE,
            max_age=settings.input_max_age_s,
            retention=RetentionPolicy(settings.input_retention),
            max_msg_size=settings.max_payload_bytes * 4,
        ),
        durable=settings.durable,
        # Small fetches: messages fetched while every worker is busy (or paused) wait with their ack clock running.
        pull_sub=PullSub(batch_size=min(settings.max_in_flight, 8), timeout=1.0),
        config=ConsumerConfig(
            max_deliver=settings.max_deliver,
            ack_wait=settings.ack_wait_s,
            max_ack_pending=settings.max_in_flight * 4,
        ),
        max_workers=settings.max_in_flight,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_body,
        title="tasks",
        description="TaskEvents to classify. Anything that is not a valid TaskEvent becomes a dead letter.",
    )
    async def classify(body: TaskEvent | bytes, msg: NatsMessage) -> None:
        data = body if isinstance(body, bytes) else body.model_dump_json().encode()
        delivery = delivery_count(msg)
        subject = msg.raw_message.subject or settings.input_subject
        try:
            await pause.wait(msg)
            held_since = service.clock.now()
            while True:
                outcome = await service.handle(data, subject=subject, headers=msg.headers, delivery=delivery)
                if (
                    isinstance(outcome, Redeliver)
                    and outcome.pause_s is not None
                    and service.clock.now() - held_since + outcome.pause_s <= settings.max_pause_s
                ):
                    # The failures said how long to wait: hold the message and stop pulling, don't spend a delivery.
                    # (At least MIN_PAUSE_S: a half-open breaker with its probe in flight says "now".)
                    pause.pause(max(outcome.pause_s, MIN_PAUSE_S))
                    await pause.wait(msg)
                    continue
                break
            await _settle(outcome, msg, service, results, dead_letters)
        except asyncio.CancelledError:
            # Shutdown grace period ran out: hand the message back now rather than after the ack wait.
            with contextlib.suppress(Exception):
                await asyncio.shield(msg.nack())
            raise
        except Exception as exc:
            # Nothing was acked: the message comes back. On its last delivery, dead-letter it instead of losing it.
            log.exception("handling failed", delivery=delivery)
            if delivery >= settings.max_deliver:
                with contextlib.suppress(Exception):
                    dead = service.dead_letter(
                        data,
                        subject=subject,
                        error_type="internal",
                        reason=f"handler failed: {type(exc).__name__}",
                        delivery=delivery,
                        errors=[f"{type(exc).__name__}: {exc}"],
                    )
                    await _dead_letter(dead_letters, dead, msg)
                    return
            await msg.nack(delay=min(2.0**delivery, 30.0))

    return FastStream(
        broker,
        specification=AsyncAPI(
            title="stanchion",
            version="0.1.0",
            description="Classifies TaskEvents with typed LLM agents behind a reliability stack.",
        ),
    )


async def _settle(
    outcome: Outcome, msg: NatsMessage, service: ClassifierService, results: Any, dead_letters: Any
) -> None:
    """Publish (confirmed by JetStream), then ack / term / nak."""
    if isinstance(outcome, Answered):
        envelope = outcome.envelope
        if not outcome.published:
            await results.publish(
                envelope.model_dump_json().encode(),
                headers={"Nats-Msg-Id": envelope.event_id, "content-type": "application/json"},
            )
            await service.published(envelope)
        await msg.ack()
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
        await _dead_letter(dead_letters, outcome.dead, msg)
    else:
        await msg.nack(delay=outcome.delay_s)


async def _dead_letter(publisher: Any, dead: DeadLetter, msg: NatsMessage) -> None:
    seq = "x"
    with contextlib.suppress(Exception):
        seq = str(msg.raw_message.metadata.sequence.stream)
    await publisher.publish(
        dead.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"dead:{dead.event_id or 'unknown'}:{seq}", "content-type": "application/json"},
    )
    await msg.reject()
    log.warning("dead-lettered", event_id=dead.event_id, error_type=dead.error_type, reason=dead.reason)


def _module_app() -> FastStream:
    """The app for ``faststream run handlers.app:app``: settings from the environment.

    ``NATS_URL`` unset: an embedded nats-server is started before the broker connects, and stopped after.
    """
    from handlers.embedded import EmbeddedNats
    from handlers.errors import ConfigError
    from handlers.logs import configure_logging
    from handlers.policy import resolve_policy
    from handlers.settings import load_settings

    try:
        settings = load_settings()
        policy = resolve_policy(settings)
        service = ClassifierService(settings, policy)
        broker = create_broker(settings)
        application = create_app(settings, service, broker=broker)
    except ConfigError as exc:
        raise SystemExit(f"stanchion: configuration error: {exc}") from None
    embedded: list[EmbeddedNats] = []

    @application.on_startup
    def start_embedded() -> None:
        configure_logging(settings.log_level, settings.log_format, service.redact.secrets)
        if settings.nats_url is None:
            server = EmbeddedNats(settings.nats_server_bin, settings.nats_store_dir)
            url = server.start()
            embedded.append(server)
            # The broker was built before the server existed; point its (not yet opened) connection at it.
            broker._connection_kwargs["servers"] = [url]
            log.info("embedded nats-server started", url=url, pid=server.process.pid if server.process else None)

    @application.after_shutdown
    def stop_embedded() -> None:
        for server in embedded:
            server.stop()

    return application


def __getattr__(name: str) -> Any:
    # `faststream run handlers.app:app` reads `app`: build it then, not whenever this module is imported.
    if name == "app":
        application = _module_app()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
