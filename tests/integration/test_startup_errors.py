"""Start-up failures against real nats-servers: one line on stderr, exit code 2, no traceback; and `stanchion publish`
when no stream stores the subject."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from faststream.nats import NatsBroker
from pydantic import BaseModel
from pydantic_ai import Agent

from stanchion import Stanchion
from stanchion.handlers.classify.app import create_app
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.embedded import EmbeddedNats, find_nats_server, free_port
from stanchion.handlers.nats.preflight import check_streams, subjects_overlap
from stanchion.handlers.policy import Policy
from stanchion.handlers.settings import Settings
from tests.conftest import STANCHION, clean_env, policy_for, service_env, unique_settings

# A user's app (`stanchion run app_module:app`): one handler, its subjects and stream binding from the environment.
USER_APP = """
import os

from faststream.nats import NatsBroker
from pydantic import BaseModel
from pydantic_ai import Agent

from stanchion import Stanchion
from stanchion.handlers.policy import Policy


class Email(BaseModel):
    id: str
    body: str


class Answer(BaseModel):
    text: str


broker = NatsBroker(os.environ["NATS_URL"])
reliable = Stanchion(broker, policy=Policy())
subject = os.environ["APP_SUBJECT"]


@reliable.agent(
    subject,
    name="mine",
    agent=Agent(output_type=Answer),
    input_stream=os.environ.get("APP_INPUT_STREAM"),
    bind_streams=os.environ.get("APP_BIND") == "1",
)
def prompt(email: Email) -> str:
    return email.body


app = reliable.app()
"""

# Accounts with and without JetStream, and a user of the JetStream account who may not use its API.
ACCOUNTS = """
accounts {
  JS: {
    jetstream: enabled
    users: [
      {user: ok, password: ok}
      {user: denied, password: denied, permissions: {publish: {deny: ["$JS.API.>"]}}}
    ]
  }
  PLAIN: { users: [ {user: plain, password: plain} ] }
}
"""


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STANCHION, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr (the test fails when there are more, or a traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


@pytest.fixture
def plain_server() -> Iterator[str]:
    """A nats-server started without -js: no JetStream at all; stopped by its PID."""
    port = free_port()
    proc = subprocess.Popen(
        [str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not answers(port):
            assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


@pytest.fixture
def accounts_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server with JetStream and the accounts of ``ACCOUNTS``."""
    config = tmp_path / "accounts.conf"
    config.write_text(ACCOUNTS)
    with EmbeddedNats(args=("-c", str(config))) as server:
        yield server


async def add_stream(url: str, name: str, subjects: list[str]) -> None:
    client = await nats.connect(url)
    try:
        await client.jetstream().add_stream(name=name, subjects=subjects)
    finally:
        await client.close()


async def stream_names(url: str) -> list[str]:
    client = await nats.connect(url)
    try:
        return sorted(s.config.name or "" for s in await client.jetstream().streams_info())
    finally:
        await client.close()


async def test_run_stops_naming_the_stream_that_already_stores_the_input_subject(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """`stanchion run` exits 2 with one line naming its stream, the existing stream and the subjects, when another
    stream already stores the input subject; it creates none of its streams."""
    settings = unique_settings(nats_server.url)
    other = f"OTHER_{settings.input_stream}"
    wildcard = settings.input_subject.rsplit(".", 1)[0] + ".*"
    await add_stream(nats_server.url, other, [wildcard])
    proc = await asyncio.to_thread(run, ["run"], service_env(settings), tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert line.startswith("stanchion: configuration error: ")
    for name in (settings.input_stream, other, settings.input_subject, wildcard, "subjects overlap"):
        assert name in line, line
    names = await stream_names(nats_server.url)
    assert other in names and settings.input_stream not in names and settings.output_stream not in names


async def test_run_of_an_app_stops_naming_the_stream_that_already_stores_a_subject(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """`stanchion run MODULE:APP` exits 2 with one line naming the handler, its stream and the other stream, when
    another stream already stores the handler's output subject."""
    (tmp_path / "app_module.py").write_text(USER_APP)
    subject = f"t{os.getpid()}.{tmp_path.name}.mail"
    await add_stream(nats_server.url, "OPERATOR_RESULTS", [f"{subject}.>"])
    env = clean_env(NATS_URL=nats_server.url, APP_SUBJECT=subject)
    proc = await asyncio.to_thread(run, ["run", "app_module:app"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    for name in ("'mine'", "STANCHION_MINE_RESULTS", "OPERATOR_RESULTS", f"{subject}.results", "output_stream="):
        assert name in line, line


async def test_run_of_an_app_with_bound_streams_stops_when_a_stream_is_missing(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A handler declared with bind_streams=True makes `stanchion run MODULE:APP` exit 2 with one line naming the
    operator's stream that does not exist."""
    (tmp_path / "app_module.py").write_text(USER_APP)
    subject = f"b{os.getpid()}.{tmp_path.name}.mail"
    stream = f"OPS_{tmp_path.name}".upper().replace("-", "_")
    env = clean_env(NATS_URL=nats_server.url, APP_SUBJECT=subject, APP_INPUT_STREAM=stream, APP_BIND="1")
    proc = await asyncio.to_thread(run, ["run", "app_module:app"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert stream in line and "does not exist" in line and "bind_streams" in line, line


def test_run_stops_when_the_server_has_no_jetstream(plain_server: str, tmp_path: Path) -> None:
    """`stanchion run` on a server without JetStream exits 2 with one line saying so (start nats-server with -js)."""
    settings = unique_settings(plain_server)
    proc = run(["run"], service_env(settings), tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert "has no JetStream" in line and "-js" in line and plain_server in line, line


def test_run_stops_when_the_account_has_no_jetstream(accounts_server: EmbeddedNats, tmp_path: Path) -> None:
    """`stanchion run` as a user whose account has no JetStream exits 2 with one line saying so."""
    env = service_env(unique_settings(accounts_server.url), NATS_USER="plain", NATS_PASSWORD="plain")
    proc = run(["run"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no JetStream for this account" in one_line(proc)


def test_run_stops_when_the_jetstream_api_is_denied(accounts_server: EmbeddedNats, tmp_path: Path) -> None:
    """`stanchion run` as a user who may not publish to $JS.API exits 2 with one line naming the permissions
    violation."""
    env = service_env(unique_settings(accounts_server.url), NATS_USER="denied", NATS_PASSWORD="denied")
    proc = run(["run"], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert "denies the JetStream API" in line and "permissions violation" in line, line


async def test_starting_the_app_in_process_raises_one_line_config_error(nats_server: EmbeddedNats) -> None:
    """The app's on_startup check raises ConfigError (under `async with app` and `faststream run`) when another
    stream stores the dead-letter subject, before FastStream's broker declares anything."""
    settings = unique_settings(nats_server.url)
    await add_stream(nats_server.url, f"X_{settings.dlq_stream}", [settings.dlq_subject])
    app, _ = create_app(settings, policy_for())
    with pytest.raises(ConfigError, match=f"stream {settings.dlq_stream} cannot store") as raised:
        async with asyncio.timeout(30), app:
            pass
    assert "\n" not in str(raised.value)
    assert settings.input_stream not in await stream_names(nats_server.url)


async def test_the_checked_connection_is_the_one_the_broker_starts_on(nats_server: EmbeddedNats) -> None:
    """The start-up check connects the broker once: FastStream's start reuses that connection (connect is
    idempotent), and the app serves on it."""
    settings = unique_settings(nats_server.url)
    app, _ = create_app(settings, policy_for())
    reliable = app.context.get("stanchion")
    assert isinstance(reliable, Stanchion)
    await check_streams(reliable.broker, reliable.handlers)
    checked = reliable.broker.config.connection_state.connection
    async with asyncio.timeout(30), app:
        assert reliable.broker.config.connection_state.connection is checked
        assert settings.input_stream in await stream_names(nats_server.url)


async def test_a_handler_on_existing_operator_streams_starts(nats_server: EmbeddedNats) -> None:
    """A handler declared with bind_streams=True starts when the operator's streams exist and store its subjects,
    and its streams are used as they are."""
    run_id = os.urandom(4).hex()
    subject = f"ops{run_id}.mail"
    ops = f"OPS{run_id}"
    streams = {f"{ops}_IN": subject, f"{ops}_OUT": f"{subject}.results", f"{ops}_DLQ": f"dlq.{subject}"}
    for name, stored in streams.items():
        await add_stream(nats_server.url, name, [stored])
    reliable = Stanchion(NatsBroker(nats_server.url), settings=Settings(nats_url=nats_server.url), policy=Policy())

    class Event(BaseModel):
        id: str

    class Answer(BaseModel):
        text: str

    in_stream, out_stream, dlq_stream = streams
    reliable.agent(
        subject,
        name=f"ops-{run_id}",
        agent=Agent(output_type=Answer),
        event=Event,
        input_stream=in_stream,
        output_stream=out_stream,
        dlq_stream=dlq_stream,
        bind_streams=True,
    )(lambda event: event.id)
    async with asyncio.timeout(30), reliable.app():
        pass
    assert [n for n in await stream_names(nats_server.url) if run_id.upper() in n.upper()] == sorted(streams)


async def test_two_handlers_whose_streams_would_overlap_stop_start_up(nats_server: EmbeddedNats) -> None:
    """Two handlers of one app whose new streams would store overlapping subjects stop start-up with one line
    naming both, before either stream is created."""
    run_id = os.urandom(4).hex()
    reliable = Stanchion(NatsBroker(nats_server.url), settings=Settings(nats_url=nats_server.url), policy=Policy())

    class Event(BaseModel):
        id: str

    class Answer(BaseModel):
        text: str

    for name, subject in ((f"wide-{run_id}", f"o{run_id}.*"), (f"narrow-{run_id}", f"o{run_id}.b")):
        reliable.agent(subject, name=name, agent=Agent(output_type=Answer), event=Event)(lambda event: event.id)
    with pytest.raises(ConfigError, match=f"handlers 'wide-{run_id}' and 'narrow-{run_id}'") as raised:
        async with asyncio.timeout(30), reliable.app():
            pass
    assert "would store overlapping subjects" in str(raised.value)
    assert not [n for n in await stream_names(nats_server.url) if run_id.upper() in n]


async def test_publish_with_no_stream_exits_1_unless_core(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """`stanchion publish` exits 1 with one line when no stream stores the subject, and 0 with --core (plain NATS)."""
    subject = f"nostream.{tmp_path.name}"
    env = clean_env(NATS_URL=nats_server.url)
    event = json.dumps({"id": "p-1", "text": "hello"})
    stored = await asyncio.to_thread(run, ["publish", subject, event], env, tmp_path)
    assert stored.returncode == 1, stored.stderr
    line = one_line(stored)
    assert f"no stream stores {subject}" in line and "--core" in line, line
    core = await asyncio.to_thread(run, ["publish", "--core", subject, event], env, tmp_path)
    assert core.returncode == 0, core.stderr
    assert "published 1 message(s)" in core.stdout and "core NATS" in core.stdout


def test_publish_to_a_server_without_jetstream_says_so(plain_server: str, tmp_path: Path) -> None:
    """`stanchion publish` on a server without JetStream exits 1 with one line saying the server has no JetStream;
    with --core it publishes and exits 0."""
    env = clean_env(NATS_URL=plain_server)
    stored = run(["publish", "tasks.classify", "{}"], env, tmp_path)
    assert stored.returncode == 1, stored.stderr
    assert "has no JetStream" in one_line(stored)
    assert run(["publish", "--core", "tasks.classify", "{}"], env, tmp_path).returncode == 0


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b", "a.*", True),
        (">", "x", True),
        ("a.b", "a.b.results", False),
    ],
)
def test_subjects_overlap_as_jetstream_counts_them(a: str, b: str, overlap: bool) -> None:
    """Two subject patterns overlap when some subject matches both (``*`` one token, ``>`` the rest)."""
    assert subjects_overlap(a, b) is overlap
    assert subjects_overlap(b, a) is overlap
