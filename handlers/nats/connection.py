"""NATS connection options from the settings: the servers, token, user/password, credentials file (nkeys/JWT), TLS."""

from __future__ import annotations

import ssl
from typing import Any

from faststream.nats import NatsCredentials, NatsSecurity, NatsToken, NatsUserPassword

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.settings import Settings


def nats_servers(url: str) -> list[str]:
    """The servers of ``NATS_URL``: one URL, or several separated by commas (the nodes of a cluster, as the nats CLI
    takes them); the client tries them in turn and learns the cluster's other nodes from the one it reaches."""
    servers = [server.strip() for server in url.split(",") if server.strip()]
    if not servers:
        raise ConfigError(f"NATS_URL: no server in {url!r} (one URL, or several separated by commas)")
    return servers


def redact_url(url: str) -> str:
    """``url`` (one or a comma-separated list) without the user names, passwords or tokens its servers carry."""
    return ",".join(_without_credentials(server.strip()) for server in url.split(","))


def _without_credentials(server: str) -> str:
    scheme, sep, rest = server.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else server.rpartition("@")[2]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A client TLS context when a CA or a client certificate is configured."""
    if settings.nats_ca is None and settings.nats_cert is None:
        return None
    if (settings.nats_cert is None) != (settings.nats_key is None):
        raise ConfigError("NATS_CERT and NATS_KEY: set both (client certificate and its key) or neither")
    try:
        context = ssl.create_default_context(cafile=str(settings.nats_ca) if settings.nats_ca else None)
        if settings.nats_cert and settings.nats_key:
            context.load_cert_chain(str(settings.nats_cert), str(settings.nats_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"NATS_CA/NATS_CERT/NATS_KEY: cannot load: {exc}") from None
    return context


def _check(settings: Settings) -> None:
    given = [
        n
        for n, v in (
            ("NATS_TOKEN", settings.nats_token),
            ("NATS_USER", settings.nats_user),
            ("NATS_CREDS", settings.nats_creds),
        )
        if v
    ]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)}: choose one way to authenticate")
    if (settings.nats_user is None) != (settings.nats_password is None):
        raise ConfigError("NATS_USER and NATS_PASSWORD: set both or neither")


def broker_security(settings: Settings) -> NatsSecurity | None:
    """FastStream's security object for the broker."""
    _check(settings)
    context = tls_context(settings)
    tls: dict[str, Any] = {"ssl_context": context} if context else {}
    if settings.nats_token:
        return NatsToken(settings.nats_token.get_secret_value(), **tls)
    if settings.nats_user and settings.nats_password:
        return NatsUserPassword(settings.nats_user, settings.nats_password.get_secret_value(), **tls)
    if settings.nats_creds:
        return NatsCredentials.from_file(settings.nats_creds, **tls)
    return NatsSecurity(**tls) if context else None


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` (the CLI's own connections)."""
    _check(settings)
    options: dict[str, Any] = {}
    if settings.nats_token:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_user and settings.nats_password:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_creds:
        options["user_credentials"] = str(settings.nats_creds)
    if (context := tls_context(settings)) is not None:
        options["tls"] = context
    return options
