"""Start-up checks, before FastStream starts the broker: JetStream is there and usable, each handler's streams, and
a replicated deployment's result bucket.

FastStream's ``broker.start()`` logs a stream it cannot create (a JetStream "subjects overlap", err_code 10065)
with a traceback and goes on, and a server without JetStream shows up later as a bare ``ServiceUnavailableError``.
:func:`check_streams` connects the broker first (FastStream's ``connect`` is idempotent: ``start`` reuses the
connection) and turns each such condition into one ``ConfigError`` line that names what to change. With
``STANCHION_STREAM_REPLICAS`` > 1 it also puts the result bucket in place on that many servers, so that a cluster too
small for the setting is a line here rather than streams FastStream could not create.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Protocol

from faststream.nats import JStream, NatsBroker
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.results import create_bucket
from stanchion.handlers.settings import Settings

CONNECT_TIMEOUT_S = 20.0
"""How long start-up waits for the broker's first connection (the broker itself would retry forever)."""

JETSTREAM_NOT_ENABLED = 10039  # "JetStream not enabled for account"


class HasSettings(Protocol):
    """A declared handler, as far as the checks go: its subjects and stream names."""

    @property
    def settings(self) -> Settings: ...


async def check_streams(
    broker: NatsBroker, handlers: Mapping[str, HasSettings], *, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Connect ``broker`` and check JetStream and the streams of every handler, before the broker starts.

    A handler's streams are declared by FastStream unless it was declared with ``bind_streams=True``; then they
    are the operator's and must exist. The broker is stopped again when a check fails.

    Raises:
        ConfigError: One line: the connection refused or not made, no JetStream (or not for this account), the
            JetStream API denied, a stream whose subjects another stream already stores, a missing bound stream,
            fewer JetStream servers than ``STANCHION_STREAM_REPLICAS``.
    """
    connection = await _connect(broker, connect_timeout_s)
    try:
        js = broker.config.connection_state.stream
        await _jetstream(js, connection)
        await _replicated_buckets(js, connection, handlers)
        await _handler_streams(js, connection, handlers, _declared(broker))
    except BaseException:
        with contextlib.suppress(Exception):
            await broker.stop()
        raise


async def _connect(broker: NatsBroker, timeout_s: float) -> Client:
    where = ", ".join(broker.specification.url) or "the broker's URL"  # credentials already taken out
    try:
        async with asyncio.timeout(timeout_s):
            return await broker.connect()
    except NatsError as exc:  # FastStream gives up at once on an authorization violation & co.
        raise ConfigError(f"NATS at {where} refused the connection: {_reason(exc)}") from None
    except TimeoutError:
        raise ConfigError(
            f"cannot connect to NATS at {where} within {timeout_s:g} s (is it running? credentials, TLS?)"
        ) from None


async def _jetstream(js: JetStreamContext, connection: Client) -> None:
    try:
        await js.account_info()
    except NatsError as exc:
        raise jetstream_error(exc, connection, "the account information ($JS.API.INFO)") from None


async def _replicated_buckets(js: JetStreamContext, connection: Client, handlers: Mapping[str, HasSettings]) -> None:
    """With ``STANCHION_STREAM_REPLICAS`` > 1: the result bucket created on that many servers (or scaled up to them)
    before anything uses it (the store would create it on one server); one bucket may serve several handlers."""
    done: set[str] = set()
    for settings in (handler.settings for handler in handlers.values()):
        replicas, bucket = settings.stream_replicas, settings.result_bucket
        if replicas == 1 or bucket in done:
            continue
        done.add(bucket)
        try:
            config = (await create_bucket(js, bucket, settings.result_ttl_s, replicas)).config
            if (config.num_replicas or 1) < replicas:
                await js.update_stream(dataclasses.replace(config, num_replicas=replicas))
        except NatsError as exc:
            error = jetstream_error(exc, connection, f"creating the result bucket {bucket} on {replicas} servers")
            needs = f"STANCHION_STREAM_REPLICAS={replicas} needs at least {replicas} JetStream servers in a cluster"
            raise ConfigError(f"{error} ({needs})") from None


async def _handler_streams(
    js: JetStreamContext, connection: Client, handlers: Mapping[str, HasSettings], declared: Mapping[str, bool]
) -> None:
    planned: list[tuple[str, str, str]] = []  # (handler, stream, subject) of the streams FastStream will declare
    for name, handler in handlers.items():
        for role, stream, subject in _streams_of(handler.settings):
            try:
                if declared.get(stream, True):
                    await _declarable(js, name, role, stream, subject)
                    planned.append((name, stream, subject))
                else:
                    await _bound(js, name, stream, subject)
            except NatsError as exc:
                raise jetstream_error(exc, connection, f"about stream {stream}") from None
    _no_overlap(planned)


def _streams_of(settings: Settings) -> list[tuple[str, str, str]]:
    """(role, stream, subject) of each of a handler's streams; the role as in ``input_stream=`` & co."""
    return [
        ("input", settings.input_stream, settings.input_subject),
        ("output", settings.output_stream, settings.output_subject),
        ("dlq", settings.dlq_stream, settings.dlq_subject),
    ]


async def _declarable(js: JetStreamContext, handler: str, role: str, stream: str, subject: str) -> None:
    """No stream of another name stores ``subject`` (JetStream would refuse ``stream``: subjects overlap)."""
    owner = await _owner(js, subject)
    if owner is None or owner == stream:
        return
    raise ConfigError(
        f"handler {handler!r}: stream {stream} cannot store {subject}: stream {owner} "
        f"(subjects {await _subjects(js, owner)}) already stores overlapping subjects (JetStream: subjects overlap); "
        f"remove or change {owner}, or make it the handler's {role} stream ({role}_stream={owner!r}, "
        "bind_streams=True to use it as it is)"
    )


async def _bound(js: JetStreamContext, handler: str, stream: str, subject: str) -> None:
    """An operator's stream (``bind_streams=True``) exists and is the one that stores ``subject``."""
    try:
        await js.stream_info(stream)
    except NotFoundError:
        raise ConfigError(
            f"handler {handler!r}: stream {stream} does not exist (bind_streams=True uses the operator's streams: "
            f"create it, storing {subject})"
        ) from None
    owner = await _owner(js, subject)
    if owner != stream:
        stored = f"stream {owner} (subjects {await _subjects(js, owner)}) does" if owner else "no stream does"
        raise ConfigError(f"handler {handler!r}: stream {stream} does not store {subject}: {stored}")


def _no_overlap(planned: list[tuple[str, str, str]]) -> None:
    """Two streams to declare, of different names, whose subjects overlap: JetStream would refuse the second."""
    for i, (handler_a, stream_a, subject_a) in enumerate(planned):
        for handler_b, stream_b, subject_b in planned[i + 1 :]:
            if stream_a != stream_b and subjects_overlap(subject_a, subject_b):
                same = handler_a == handler_b
                who = f"handler {handler_a!r}" if same else f"handlers {handler_a!r} and {handler_b!r}"
                raise ConfigError(
                    f"{who}: streams {stream_a} ({subject_a}) and {stream_b} ({subject_b}) would store overlapping "
                    "subjects (JetStream: subjects overlap)"
                )


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both NATS subject patterns (``*``: one token, ``>``: one or more at the end)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)


async def _owner(js: JetStreamContext, subject: str) -> str | None:
    """The stream whose subjects overlap ``subject`` (JetStream allows one at most), if any."""
    try:
        return await js.find_stream_name_by_subject(subject)
    except NotFoundError:
        return None


async def _subjects(js: JetStreamContext, stream: str) -> str:
    with contextlib.suppress(APIError, NatsTimeoutError):
        return ", ".join((await js.stream_info(stream)).config.subjects or ()) or "none"
    return "unknown"


def _declared(broker: NatsBroker) -> dict[str, bool]:
    """Stream name → whether FastStream declares it (``JStream.declare``), from the broker's subscribers and
    publishers; a handler's streams are not declared when it uses an operator's (``bind_streams=True``)."""
    declared: dict[str, bool] = {}
    for endpoint in [*broker.subscribers, *broker.publishers]:
        stream = getattr(endpoint, "stream", None)
        if isinstance(stream, JStream):
            declared[stream.name] = declared.get(stream.name, False) or bool(stream.declare)
    return declared


def jetstream_error(exc: NatsError, connection: Client, what: str) -> ConfigError:
    """One line for a JetStream request that failed: no JetStream (or not for the account), denied, refused.

    Args:
        exc: What the request raised.
        connection: Its connection (the server's address; a permissions violation is its last error).
        what: What was asked, for the line: "the account information", "about stream X"...
    """
    server = _server(connection)
    if isinstance(exc, ServiceUnavailableError):
        if exc.err_code == JETSTREAM_NOT_ENABLED:
            return ConfigError(f"the NATS server at {server} has no JetStream for this account (enable it there)")
        return ConfigError(f"the NATS server at {server} has no JetStream (start nats-server with -js)")
    if isinstance(exc, NatsTimeoutError):
        last = connection.last_error
        if last is not None and "permissions violation" in str(last).lower():
            return ConfigError(
                f"the NATS server at {server} denies the JetStream API: {_reason(last)} "
                "(the user needs to publish to $JS.API.>)"
            )
        return ConfigError(f"the JetStream API at {server} did not answer {what} in time")
    if isinstance(exc, APIError):
        return ConfigError(f"JetStream at {server} refused {what}: {exc.description} (err_code {exc.err_code})")
    return ConfigError(f"NATS at {server}: {what}: {_reason(exc)}")


def _server(connection: Client) -> str:
    """The server connected to, without credentials."""
    url = connection.connected_url
    if url is None or url.hostname is None:
        return "the broker's URL"
    return f"{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else "")


def _reason(exc: BaseException) -> str:
    return str(exc).removeprefix("nats: ").strip("'") or type(exc).__name__
