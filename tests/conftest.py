"""Shared fixtures: one real nats-server per session, fake OpenAI-compatible servers, an in-process service."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from stanchion.handlers.api import Handler
from stanchion.handlers.classify.app import create_app
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.policy import Policy
from stanchion.handlers.settings import Settings
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
STANCHION = str(Path(sys.executable).parent / "stanchion")


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without any NATS/provider/stanchion settings, plus ``extra``."""
    drop = ("NATS_", "OPENAI_", "ANTHROPIC_", "OLLAMA_", "STANCHION_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "OLLAMA_BASE_URL": "http://127.0.0.1:9/v1", **extra}


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `stanchion run` subprocess using the subjects, streams and names of ``settings``."""
    names = {
        "STANCHION_INPUT_SUBJECT": settings.input_subject,
        "STANCHION_OUTPUT_SUBJECT": settings.output_subject,
        "STANCHION_DLQ_SUBJECT": settings.dlq_subject,
        "STANCHION_INPUT_STREAM": settings.input_stream,
        "STANCHION_OUTPUT_STREAM": settings.output_stream,
        "STANCHION_DLQ_STREAM": settings.dlq_stream,
        "STANCHION_DURABLE": settings.durable,
        "STANCHION_RESULT_BUCKET": settings.result_bucket,
    }
    return clean_env(NATS_URL=settings.nats_url or "", **{**names, **extra})


def start_service(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """`stanchion run` in a subprocess; its output is appended to ``cwd/service.log`` (restarts share it)."""
    with open(cwd / "service.log", "ab") as sink:
        return subprocess.Popen([STANCHION, "run"], env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)


def stop_service(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int | None:
    """Signal the process by its PID if it still runs, wait for it, and return its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        os.kill(process.pid, sig)
    return process.wait(30)


async def wait_for_consumer(
    client: Client, settings: Settings, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Wait until the service has created its durable consumer (and fail early if its process died)."""
    js = client.jetstream()
    async with asyncio.timeout(timeout):
        while True:
            assert process is None or process.poll() is None, "the service process exited"
            try:
                await js.consumer_info(settings.input_stream, settings.durable)
                return
            except NotFoundError:
                await asyncio.sleep(0.1)


_names = itertools.count()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A real nats-server with JetStream on a free loopback port, for the whole session."""
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("nats-store"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_openai() -> Iterator[Callable[..., FakeOpenAI]]:
    """Start fake OpenAI-compatible servers on demand; all are stopped after the test."""
    started: list[FakeOpenAI] = []

    def start(**kwargs: Any) -> FakeOpenAI:
        server = FakeOpenAI(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def unique_settings(nats_url: str, **overrides: Any) -> Settings:
    """Settings with subjects, streams and durable unique to one test, so tests never see each other's messages."""
    n = next(_names)
    names: dict[str, Any] = {
        "input_subject": f"t{n}.tasks.classify",
        "output_subject": f"t{n}.tasks.classified",
        "dlq_subject": f"t{n}.dlq.tasks.classify",
        "input_stream": f"T{n}_TASKS",
        "output_stream": f"T{n}_RESULTS",
        "dlq_stream": f"T{n}_DLQ",
        "durable": f"t{n}-classifier",
        "result_bucket": f"t{n}_results",
    }
    return Settings(nats_url=nats_url, **{**names, **overrides})


@dataclass
class Collector:
    """Collects result envelopes and dead letters from core NATS subscriptions."""

    results: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_result(self, msg: Msg) -> None:
        self.results.append(json.loads(msg.data))
        self.changed.set()

    async def on_dead(self, msg: Msg) -> None:
        self.dead.append(json.loads(msg.data))
        self.changed.set()

    async def wait_for(self, results: int = 0, dead: int = 0, timeout: float = 30.0) -> None:
        """Wait until at least this many results and dead letters arrived."""
        async with asyncio.timeout(timeout):
            while len(self.results) < results or len(self.dead) < dead:
                self.changed.clear()
                await self.changed.wait()


@dataclass
class RunningService:
    settings: Settings
    service: Handler[Any, Any]
    client: Client
    collector: Collector
    app: Any = None
    """The FastStream app (its context holds the ``Stanchion``)."""

    async def publish(self, event: dict[str, Any] | bytes) -> None:
        data = event if isinstance(event, bytes) else json.dumps(event).encode()
        await self.client.jetstream().publish(self.settings.input_subject, data)


@asynccontextmanager
async def running_service(
    nats_url: str, policy: Policy, settings: Settings | None = None, **overrides: Any
) -> AsyncIterator[RunningService]:
    """The FastStream app in-process on the session's nats-server, with collectors on its outputs."""
    settings = settings or unique_settings(nats_url, **overrides)
    app, service = create_app(settings, policy, url=nats_url)
    # Back within 0.1 s of a server restart, before the service (1 s): results published meanwhile on core NATS
    # would otherwise pass the collector by (a chaos test restarts the server under it).
    client = await nats.connect(nats_url, reconnect_time_wait=0.1)
    collector = Collector()
    await client.subscribe(settings.output_subject, cb=collector.on_result)
    await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
    try:
        async with app:
            yield RunningService(settings, service, client, collector, app)
    finally:
        await client.close()


def policy_for(
    *servers: tuple[str, FakeOpenAI],
    heuristic: bool = True,
    breaker: dict[str, Any] | None = None,
    model_options: dict[str, dict[str, Any]] | None = None,
    **route: Any,
) -> Policy:
    """A policy whose models are the given fake servers, tried in the order given."""
    models = [
        {
            "name": name,
            "model": "openai-chat:gpt-4o-mini",
            "base_url": server.base_url,
            "output_mode": "tool",
            **(model_options or {}).get(name, {}),
        }
        for name, server in servers
    ]
    default = {"models": [name for name, _ in servers], "heuristic": heuristic, **route}
    return Policy.model_validate({"models": models, "routes": {"default": default}, "breaker": breaker or {}})


async def read_stream(client: Client, stream: str) -> list[dict[str, Any]]:
    """Every message stored in a JetStream stream, decoded, oldest first: what a consumer of it would see."""
    js = client.jetstream()
    items: list[dict[str, Any]] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq, subject=">", next=True)
        except NotFoundError:
            return items
        items.append(json.loads(msg.data or b"{}"))
        seq = (msg.seq or seq) + 1


def assert_each_accounted_once(ids: list[str], results: list[dict[str, Any]], dead: list[dict[str, Any]]) -> None:
    """Every input event has exactly one result envelope or one dead letter; no event has two results."""
    result_counts = Counter(r["event_id"] for r in results)
    dead_counts = Counter(d.get("event_id") for d in dead)
    duplicated = sorted(i for i, n in result_counts.items() if n > 1)
    assert duplicated == [], f"events with more than one result: {duplicated[:10]}"
    lost = sorted(i for i in ids if result_counts[i] + dead_counts[i] == 0)
    assert lost == [], f"{len(lost)} events lost: {lost[:10]}"
    twice = sorted(i for i in ids if result_counts[i] + dead_counts[i] > 1)
    assert twice == [], f"events both answered and dead-lettered: {twice[:10]}"
    assert set(result_counts) | {i for i in dead_counts if i is not None} <= set(ids)
