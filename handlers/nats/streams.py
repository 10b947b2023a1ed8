"""A handler's JetStream streams and durable consumer: names, limits, and bringing an existing durable up to date."""

from __future__ import annotations

import dataclasses
import re

import structlog
from faststream.nats import JStream
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType
from nats.js.errors import BadRequestError, NotFoundError

from stanchion.handlers.settings import Settings

log = structlog.get_logger("stanchion.app")

PULL_BATCH = 8


def stream_prefix(handler: str) -> str:
    """``refund`` → ``STANCHION_REFUND``: the start of a handler's derived stream names."""
    return "STANCHION_" + re.sub(r"[^A-Za-z0-9]+", "_", handler).strip("_").upper()


def pull_batch(settings: Settings) -> int:
    """Messages asked for by one pull request."""
    return min(settings.max_in_flight, PULL_BATCH)


def max_ack_pending(settings: Settings) -> int:
    """Unacked messages the durable allows: every worker busy and one pull batch waiting for them, per replica.

    A pull request keeps the messages it got until its batch is full; counted against a limit of just the
    workers, they left about half a batch of workers idle (bench: 4 % more events/s on a 200 ms provider at 64 in
    flight with the extra batch). A waiting message is not yet kept alive: it waits for the first worker to finish.
    """
    return (settings.max_in_flight + pull_batch(settings)) * settings.replicas


def input_stream(settings: Settings, *, declare: bool = True) -> JStream:
    """The stream that stores the handler's input subject (``declare=False``: an operator's, used as it is), on
    ``STANCHION_STREAM_REPLICAS`` servers."""
    if not declare:
        return JStream(settings.input_stream, declare=False)
    return JStream(
        settings.input_stream,
        subjects=[settings.input_subject],
        storage=StorageType.FILE,
        max_age=settings.input_max_age_s,
        retention=RetentionPolicy(settings.input_retention),
        num_replicas=settings.stream_replicas,
    )


def output_stream(
    name: str, subject: str, settings: Settings, *, dead_letters: bool = False, declare: bool = True
) -> JStream:
    """A file-backed stream that drops a second message with the same Nats-Msg-Id within the dedup window, and
    keeps messages for ``STANCHION_OUTPUT_MAX_AGE_S`` (dead letters: ``STANCHION_DLQ_MAX_AGE_S``) and up to the
    size cap, oldest first, on ``STANCHION_STREAM_REPLICAS`` servers."""
    if not declare:
        return JStream(name, declare=False)
    return JStream(
        name,
        subjects=[subject],
        duplicate_window=settings.dedup_window_s,
        storage=StorageType.FILE,
        max_age=settings.dlq_max_age_s if dead_letters else settings.output_max_age_s,
        max_bytes=settings.dlq_max_bytes if dead_letters else settings.output_max_bytes,
        num_replicas=settings.stream_replicas,
    )


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.durable,
        max_deliver=settings.max_deliver,
        ack_wait=settings.ack_wait_s,
        max_ack_pending=max_ack_pending(settings),
    )


async def recreate_stream(js: JetStreamContext, stream: JStream) -> bool:
    """Create ``stream`` again as it was declared when it is gone (deleted by an operator or a fault); ``True``
    when it had to."""
    try:
        await js.stream_info(stream.name)
        return False
    except NotFoundError:
        pass
    # FastStream keeps a declared stream's subjects beside its config (``JStream.subjects``), not in it.
    config = dataclasses.replace(stream.config, subjects=list(stream.subjects))
    try:
        await js.add_stream(config=config)
    except BadRequestError:  # created again meanwhile, with another configuration: bring it back to ours
        await js.update_stream(config=config)
    return True


async def reconcile_consumer(js: JetStreamContext, settings: Settings) -> None:
    """An existing durable keeps its old config when FastStream attaches to it: bring it up to the settings."""
    info = await js.consumer_info(settings.input_stream, settings.durable)
    wanted = (settings.max_deliver, settings.ack_wait_s, max_ack_pending(settings))
    have = (info.config.max_deliver, info.config.ack_wait, info.config.max_ack_pending)
    if have != wanted:
        config = dataclasses.replace(info.config, max_deliver=wanted[0], ack_wait=wanted[1], max_ack_pending=wanted[2])
        await js.add_consumer(settings.input_stream, config)  # create-or-update, in place
        log.warning("updated the durable consumer to the settings", durable=settings.durable, had=have)
