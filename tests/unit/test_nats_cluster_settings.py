"""A NATS cluster from the settings: several servers in ``NATS_URL``, every stream on ``STANCHION_STREAM_REPLICAS``."""

from __future__ import annotations

import pytest

from stanchion import ConfigError
from stanchion.handlers.nats.broker import create_broker
from stanchion.handlers.nats.connection import nats_servers, redact_url
from stanchion.handlers.nats.streams import input_stream, output_stream
from stanchion.handlers.settings import Settings


def test_nats_url_lists_servers_separated_by_commas() -> None:
    """One URL is one server; several, separated by commas (spaces allowed), are the cluster's seed servers."""
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert nats_servers("nats://a:4222, nats://b:4223,,nats://c:4224 ") == [
        "nats://a:4222",
        "nats://b:4223",
        "nats://c:4224",
    ]


def test_a_nats_url_without_a_server_is_a_config_error() -> None:
    """Nothing but commas and spaces names no server: a ConfigError naming NATS_URL."""
    with pytest.raises(ConfigError, match="NATS_URL"):
        nats_servers(" , ")


def test_credentials_are_taken_out_of_every_server_of_the_list() -> None:
    """User names, passwords and tokens of each server are left out of the URL shown in messages."""
    url = "nats://alice:s3cret@a:4222,tls://tok3n@b:4223,nats://c:4224"
    assert redact_url(url) == "nats://a:4222,tls://b:4223,nats://c:4224"
    assert "s3cret" not in redact_url(url) and "tok3n" not in redact_url(url)


def test_the_broker_connects_to_every_server_listed() -> None:
    """The broker built from the settings is given every server, as its AsyncAPI servers (what start-up errors
    show) say, without credentials."""
    broker = create_broker(Settings(nats_url="nats://alice:s3cret@127.0.0.1:4222,nats://127.0.0.1:4223"))
    assert broker.specification.url == ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]


@pytest.mark.parametrize("replicas", [1, 3])
def test_every_stream_the_service_declares_is_on_stream_replicas_servers(replicas: int) -> None:
    """The input, output and dead-letter streams are declared with STANCHION_STREAM_REPLICAS replicas (and
    recreated from that declaration)."""
    settings = Settings(stream_replicas=replicas)
    streams = [
        input_stream(settings),
        output_stream(settings.output_stream, settings.output_subject, settings),
        output_stream(settings.dlq_stream, settings.dlq_subject, settings, dead_letters=True),
    ]
    assert [s.config.num_replicas for s in streams] == [replicas] * 3
