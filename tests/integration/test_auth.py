"""NATS connection security against real nats-servers started with a token, a user and password, or TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from stanchion.handlers.classify.app import create_app
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.settings import Settings
from tests.conftest import (
    STANCHION,
    Collector,
    clean_env,
    policy_for,
    start_service,
    stop_service,
    unique_settings,
    wait_for_consumer,
)

TOKEN = "tok-" + uuid.uuid4().hex
USER, PASSWORD = "stanchion", "pw-" + uuid.uuid4().hex


@pytest.fixture
def token_server() -> Iterator[EmbeddedNats]:
    """A nats-server of its own that requires ``TOKEN``."""
    with EmbeddedNats(args=("--auth", TOKEN)) as server:
        yield server


@pytest.fixture
def password_server() -> Iterator[EmbeddedNats]:
    """A nats-server of its own that requires ``USER`` and ``PASSWORD``."""
    with EmbeddedNats(args=("--user", USER, "--pass", PASSWORD)) as server:
        yield server


@asynccontextmanager
async def serving(settings: Settings, **client_options: Any) -> AsyncIterator[tuple[Client, Collector]]:
    """The app in-process, connecting with nothing but ``settings``; a client of the test's own sees its results."""
    app, _ = create_app(settings, policy_for())
    assert settings.nats_url is not None
    client = await nats.connect(settings.nats_url, allow_reconnect=False, **client_options)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
    try:
        async with asyncio.timeout(30), app:
            yield client, collector
    finally:
        await client.close()


async def answers_one_event(settings: Settings, **client_options: Any) -> list[dict[str, Any]]:
    """Publish one event to the in-process service; the results it published."""
    async with serving(settings, **client_options) as (client, collector):
        event = {"id": f"auth-{uuid.uuid4().hex[:8]}", "text": "the login page crashes"}
        await client.jetstream().publish(settings.input_subject, json.dumps(event).encode())
        await collector.wait_for(results=1, timeout=20)
    assert collector.dead == []
    assert [r["event_id"] for r in collector.results] == [event["id"]]
    return collector.results


async def test_the_service_answers_on_a_token_protected_server(token_server: EmbeddedNats) -> None:
    """With NATS_TOKEN in the settings, the service connects to a token-protected server and answers an event."""
    settings = unique_settings(token_server.url, nats_token=TOKEN)
    await answers_one_event(settings, token=TOKEN)


async def test_the_service_answers_on_a_password_protected_server(password_server: EmbeddedNats) -> None:
    """With NATS_USER and NATS_PASSWORD in the settings, the service connects and answers an event."""
    settings = unique_settings(password_server.url, nats_user=USER, nats_password=PASSWORD)
    await answers_one_event(settings, user=USER, password=PASSWORD)


def test_stanchion_run_with_a_wrong_token_fails_fast_with_one_clear_line(
    token_server: EmbeddedNats, tmp_path: Path
) -> None:
    """`stanchion run` with a wrong NATS_TOKEN exits non-zero within seconds: one line naming NATS and the
    authorization failure, no traceback, and the token it was given nowhere in its output."""
    wrong = "tok-" + uuid.uuid4().hex
    started = time.monotonic()
    proc = subprocess.run(
        [STANCHION, "run"],
        env=clean_env(NATS_URL=token_server.url, NATS_TOKEN=wrong),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 20
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "NATS" in lines[0] and "authorization" in lines[0].lower(), lines[0]
    assert wrong not in proc.stdout + proc.stderr


async def test_stanchion_run_with_the_right_token_answers_and_stops_on_sigterm(
    token_server: EmbeddedNats, tmp_path: Path
) -> None:
    """`stanchion run` with the right NATS_TOKEN answers an event, keeps the token out of its logs, and exits 0 on
    SIGTERM."""
    settings = unique_settings(token_server.url)
    names = ("input_subject", "output_subject", "input_stream", "durable")
    env = clean_env(
        NATS_URL=token_server.url,
        NATS_TOKEN=TOKEN,
        **{f"STANCHION_{name.upper()}": getattr(settings, name) for name in names},
    )
    log = tmp_path / "service.log"
    service = start_service(env, tmp_path)
    client = await nats.connect(token_server.url, token=TOKEN)
    collector = Collector()
    try:
        await client.subscribe(settings.output_subject, cb=collector.on_result)
        await wait_for_consumer(client, settings, service)
        await client.jetstream().publish(
            settings.input_subject, json.dumps({"id": "tok-1", "text": "add dark mode"}).encode()
        )
        await collector.wait_for(results=1, timeout=20)
    finally:
        await client.close()
        code = stop_service(service)
    assert code == 0, log.read_text()
    assert [r["event_id"] for r in collector.results] == ["tok-1"]
    assert TOKEN not in log.read_text()


@pytest.mark.parametrize(
    "given",
    [{"NATS_USER": USER}, {"NATS_PASSWORD": PASSWORD}],
    ids=["user-without-password", "password-without-user"],
)
def test_half_a_user_and_password_is_a_configuration_error_naming_both(
    given: dict[str, str], password_server: EmbeddedNats, tmp_path: Path
) -> None:
    """NATS_USER without NATS_PASSWORD (or the reverse) stops `stanchion run` with one line naming both, no
    traceback, and no password in the output."""
    proc = subprocess.run(
        [STANCHION, "run"],
        env=clean_env(NATS_URL=password_server.url, **given),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "configuration error" in lines[0] and "NATS_USER" in lines[0] and "NATS_PASSWORD" in lines[0], lines[0]
    assert PASSWORD not in proc.stdout + proc.stderr


# -- TLS ---------------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, usage: str, cwd: Path) -> None:
    """``name.pem`` and ``name.key``, signed by the test CA, valid for 127.0.0.1."""
    (cwd / f"{name}.ext").write_text(
        f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=cwd,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
        cwd=cwd,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=stanchion test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=tmp_path,
    )
    _signed("server", "serverAuth", tmp_path)
    _signed("client", "clientAuth", tmp_path)
    return tmp_path


@pytest.fixture
def tls_server(pki: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of its own that requires TLS and a client certificate signed by the test CA."""
    args = (
        "--tlsverify",
        "--tlscert",
        str(pki / "server.pem"),
        "--tlskey",
        str(pki / "server.key"),
        "--tlscacert",
        str(pki / "ca.pem"),
    )
    with EmbeddedNats(args=args) as server:
        yield server


def _client_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


async def test_the_service_answers_over_mutual_tls(tls_server: EmbeddedNats, pki: Path) -> None:
    """With NATS_CA, NATS_CERT and NATS_KEY in the settings, the service connects over verified TLS with its client
    certificate and answers an event."""
    settings = unique_settings(
        tls_server.url, nats_ca=pki / "ca.pem", nats_cert=pki / "client.pem", nats_key=pki / "client.key"
    )
    await answers_one_event(settings, tls=_client_context(pki))


def test_stanchion_run_without_a_client_certificate_is_refused_with_one_line(
    tls_server: EmbeddedNats, pki: Path
) -> None:
    """`stanchion run` trusting the CA but without the client certificate the server requires exits non-zero with
    one line naming NATS, and no traceback."""
    proc = subprocess.run(
        [STANCHION, "run"],
        env=clean_env(NATS_URL=tls_server.url, NATS_CA=str(pki / "ca.pem")),
        cwd=pki,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "NATS" in lines[0], proc.stderr
