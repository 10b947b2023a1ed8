"""The NATS broker from the settings, and what the handlers read off each FastStream message."""

from __future__ import annotations

import logging

from faststream.nats import NatsBroker, NatsMessage
from nats.errors import NotJSMessageError

from stanchion.handlers.nats.connection import broker_security, nats_servers
from stanchion.handlers.observability.telemetry import TelemetryMiddleware
from stanchion.handlers.settings import Settings

DEFAULT_URL = "nats://127.0.0.1:4222"


def create_broker(settings: Settings, url: str | None = None) -> NatsBroker:
    """A broker that reconnects forever after a server restart; URL, auth and TLS from the settings.

    Args:
        settings: ``NATS_URL`` (else ``nats://127.0.0.1:4222``; several servers separated by commas), credentials,
            TLS, shutdown grace, tracing.
        url: Overrides ``NATS_URL`` (the same form).
    """
    return NatsBroker(
        nats_servers(url or settings.nats_url or DEFAULT_URL),
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


async def raw_body(msg: NatsMessage) -> bytes:
    """Hand the handler the bytes as they arrived: it validates them itself."""
    return msg.body


def delivery_count(msg: NatsMessage) -> int:
    try:
        return int(msg.raw_message.metadata.num_delivered)
    except NotJSMessageError:  # a core NATS message (e.g. under TestNatsBroker): its first and only delivery
        return 1
