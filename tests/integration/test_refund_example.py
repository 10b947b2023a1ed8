"""The README's "Your own agent" example (examples/refund) on a real nats-server, its models over real HTTP.

The example is imported as a user's module is: with its environment set first (NATS_URL, REFUND_PRIMARY_URL,
REFUND_BACKUP_URL, OPENAI_API_KEY), and reloaded for each test, so that each test gets a fresh app.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
import pytest
from faststream.nats import NatsBroker
from nats.aio.client import Client
from pydantic import BaseModel
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from stanchion import ResultEnvelope, Stanchion
from stanchion.handlers.models.providers import ModelTarget, output_spec
from stanchion.handlers.models.terminal import AgentTerminal
from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.observability.report import gather
from stanchion.handlers.policy import Policy
from stanchion.handlers.settings import Settings
from stanchion.middleware import BreakerState, Candidate
from tests.conftest import ROOT, STANCHION, Collector, clean_env, read_stream, stop_service
from tests.fake_openai import FakeOpenAI

FASTSTREAM = str(Path(sys.executable).parent / "faststream")
KEY = "sk-test-refund-0123456789"


def refund_answer(text: str) -> dict[str, Any]:
    """What a good model extracts from the example's emails: the order after "order", the euros, the reason."""
    order = re.search(r"order (\S+)", text)
    euros = re.search(r"(\d+(?:\.\d+)?) ?(?:EUR|€)", text)
    reason = "damaged" if "broken" in text else "late" if "late" in text else "other"
    return {
        "order_id": order.group(1) if order else "none",
        "amount_eur": float(euros.group(1)) if euros else 0.0,
        "reason": reason,
    }


def email(event_id: str, body: str = "My order A-1001 arrived broken, please refund 25.50 EUR") -> dict[str, str]:
    return {"id": event_id, "sender": "ann@example.com", "body": body}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A nats-server of this module's own: the example's subjects and streams are fixed."""
    with EmbeddedNats(store_dir=tmp_path_factory.mktemp("refund-nats")) as nats_server:
        yield nats_server


@pytest.fixture
def providers(fake_openai: Callable[..., FakeOpenAI]) -> tuple[FakeOpenAI, FakeOpenAI]:
    return fake_openai(answer=refund_answer), fake_openai(answer=refund_answer)


@pytest.fixture
def env(server: EmbeddedNats, providers: tuple[FakeOpenAI, FakeOpenAI]) -> dict[str, str]:
    primary, backup = providers
    return clean_env(
        NATS_URL=server.url,
        REFUND_PRIMARY_URL=primary.base_url,
        REFUND_BACKUP_URL=backup.base_url,
        OPENAI_API_KEY=KEY,
    )


def load(module: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import (or re-import) an example module with ``env`` as its environment."""
    for name in [k for k in os.environ if k.startswith(("NATS_", "OPENAI_", "REFUND_", "STANCHION_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(("NATS_", "OPENAI_", "REFUND_")):
            monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(ROOT))
    if module in sys.modules:
        return importlib.reload(sys.modules[module])
    return importlib.import_module(module)


class Running:
    def __init__(self, module: ModuleType, client: Client, collector: Collector) -> None:
        self.module = module
        self.client = client
        self.collector = collector

    @property
    def handler(self) -> Any:
        return self.module.reliable.handlers["refund"]

    async def publish(self, event: dict[str, Any] | bytes, subject: str = "emails.refund") -> None:
        data = event if isinstance(event, bytes) else json.dumps(event).encode()
        await self.client.jetstream().publish(subject, data)


@pytest.fixture
async def refund(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    """examples.refund.service's app, running in-process, with collectors on its output and dead-letter subjects."""
    module = load("examples.refund.service", env, monkeypatch)
    client = await nats.connect(env["NATS_URL"])
    collector = Collector()
    await client.subscribe("emails.refund.extracted", cb=collector.on_result)
    await client.subscribe("dlq.emails.refund", cb=collector.on_dead)
    try:
        async with module.app:
            yield Running(module, client, collector)
    finally:
        await client.close()


def ours(items: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [i for i in items if str(i.get("event_id", "")).startswith(prefix)]


async def test_valid_emails_are_answered_with_typed_refund_envelopes(
    refund: Running, providers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    """Each email gets one ResultEnvelope[Refund] from the primary, naming the handler, on the fast path."""
    primary, backup = providers
    run = uuid.uuid4().hex[:6]
    for i in range(3):
        await refund.publish(email(f"{run}-{i}", f"The order B-{i}00 came late, refund {10 + i} EUR"))
    await refund.collector.wait_for(results=3)
    Envelope = ResultEnvelope[refund.module.Refund]  # type: ignore[name-defined]
    envelopes = sorted((Envelope.model_validate(r) for r in refund.collector.results), key=lambda e: e.event_id)
    assert [e.event_id for e in envelopes] == [f"{run}-{i}" for i in range(3)]
    assert [e.result.order_id for e in envelopes] == ["B-000", "B-100", "B-200"]
    assert [e.result.amount_eur for e in envelopes] == [10.0, 11.0, 12.0]
    assert {e.result.reason for e in envelopes} == {"late"}
    assert all(e.handler == "refund" and e.model == "primary" and not e.degraded for e in envelopes)
    assert all(e.usage.requests == 1 and e.usage.input_tokens > 0 for e in envelopes)
    assert (primary.count, backup.count) == (3, 0)
    assert refund.handler.terminal.fast_requests == 3 and refund.handler.terminal.agent_runs == 0


async def test_bad_payloads_are_dead_lettered_with_a_reason(refund: Running) -> None:
    """Bad JSON, an email without a body, and bytes that are not UTF-8 each become a dead letter saying why."""
    run = uuid.uuid4().hex[:6]
    await refund.publish(b"{not json")
    await refund.publish(json.dumps({"id": f"{run}-nobody", "sender": "x@example.com"}).encode())
    await refund.publish(b"\xff\xfe not utf-8")
    await refund.collector.wait_for(dead=3)
    by_type = {d["error_type"]: d for d in refund.collector.dead}
    assert set(by_type) == {"poison.json", "poison.schema", "poison.encoding"}
    assert "not JSON" in by_type["poison.json"]["reason"]
    schema = by_type["poison.schema"]
    assert "not a Email" in schema["reason"] and "body" in schema["reason"] and schema["event_id"] == f"{run}-nobody"
    assert by_type["poison.encoding"]["payload_encoding"] == "base64"
    assert all(d["handler"] == "refund" and d["subject"] == "emails.refund" for d in refund.collector.dead)
    assert refund.collector.results == []


async def test_a_republished_answered_email_gets_no_second_model_call(
    refund: Running, providers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    """The same email published again is answered from the result store: the model is not called again."""
    primary, _ = providers
    event = email(f"{uuid.uuid4().hex[:6]}-again")
    await refund.publish(event)
    await refund.collector.wait_for(results=1)
    await asyncio.sleep(0.2)  # the published mark
    await refund.publish(event)
    await asyncio.sleep(1.0)
    assert primary.count == 1
    stats = refund.handler.stats
    assert (stats.answered, stats.from_store) == (1, 1)
    stored = await read_stream(refund.client, "STANCHION_REFUND_RESULTS")
    assert [r["event_id"] for r in stored].count(event["id"]) == 1


async def test_primary_answering_503_is_served_by_backup_and_its_breaker_opens(
    refund: Running, providers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    """With the primary down, every email is served by the backup, and the primary's circuit opens."""
    primary, backup = providers
    primary.set(always="503")
    run = uuid.uuid4().hex[:6]
    for i in range(6):
        await refund.publish(email(f"{run}-{i}"))
    await refund.collector.wait_for(results=6)
    assert {r["model"] for r in refund.collector.results} == {"backup"}
    assert not any(r["degraded"] for r in refund.collector.results)
    assert await refund.handler.breaker.state("primary") is BreakerState.OPEN
    assert primary.count < 6 * 2  # the open circuit spared it most of the 12 attempts
    assert backup.count == 6


async def test_both_models_down_the_regex_heuristic_answers_degraded(
    refund: Running, providers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    """With both models failing, the example's regex heuristic extracts the refund, marked degraded."""
    for provider in providers:
        provider.set(always="500")
    await refund.publish(email(f"{uuid.uuid4().hex[:6]}-h", "Order #C-777: the mug arrived broken. Refund 12,50 €"))
    await refund.collector.wait_for(results=1)
    [envelope] = refund.collector.results
    assert envelope["degraded"] is True and envelope["model"] == "heuristic"
    assert envelope["result"] == {"order_id": "C-777", "amount_eur": 12.5, "reason": "damaged"}


async def test_report_dead_letters_and_docs_of_the_example_from_the_command_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`stanchion run examples.refund.service:app` serves it; `stanchion report` names the handler; `stanchion
    dlq list` lists its dead letters; `faststream docs gen` documents Email and Refund."""
    run = uuid.uuid4().hex[:6]
    log = tmp_path / "service.log"
    with open(log, "ab") as sink:
        service = subprocess.Popen(
            [STANCHION, "run", "examples.refund.service:app"], env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
        )
    client = await nats.connect(env["NATS_URL"])
    collector = Collector()
    try:
        await client.subscribe("emails.refund.extracted", cb=collector.on_result)
        await client.subscribe("dlq.emails.refund", cb=collector.on_dead)
        js = client.jetstream()
        async with asyncio.timeout(30):
            while True:
                assert service.poll() is None, log.read_text()
                try:
                    await js.consumer_info("STANCHION_REFUND_EVENTS", "stanchion-refund")
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        await js.publish("emails.refund", json.dumps(email(f"{run}-cli")).encode())
        await js.publish("emails.refund", json.dumps({"id": f"{run}-poison", "sender": "x"}).encode())
        await collector.wait_for(results=1, dead=1)
        report = await asyncio.to_thread(
            subprocess.run, [STANCHION, "report", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        text = await asyncio.to_thread(
            subprocess.run,
            [STANCHION, "report"],
            env={**env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        dlq = await asyncio.to_thread(
            subprocess.run,
            [STANCHION, "dlq", "list", "--app", "examples.refund.service:app"],
            env={**env, "COLUMNS": "250"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        await client.close()
        code = stop_service(service)
    assert code == 0, log.read_text()
    assert report.returncode == 0, report.stderr
    [section] = [h for h in json.loads(report.stdout)["handlers"] if h["handler"] == "refund"]
    assert section["subject"] == "emails.refund" and section["combined"]["answered"] == 1
    assert "handler refund (emails.refund)" in text.stdout
    assert dlq.returncode == 0, dlq.stderr
    assert "STANCHION_REFUND_DLQ" in dlq.stdout and f"{run}-poison" in dlq.stdout and "poison.schema" in dlq.stdout
    assert KEY not in log.read_text()

    out = tmp_path / "asyncapi.json"
    docs = await asyncio.to_thread(
        subprocess.run,
        [FASTSTREAM, "docs", "gen", "examples.refund.service:app", "-o", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert docs.returncode == 0, docs.stderr
    schemas = json.loads(out.read_text())["components"]["schemas"]
    assert "Email" in schemas and "Refund" in schemas
    assert set(schemas["Email"]["properties"]) == {"id", "sender", "body"}


async def test_faststream_run_serves_the_example(env: dict[str, str], tmp_path: Path) -> None:
    """FastStream's own runner serves the example as it is (NATS_URL set), and stops on SIGTERM."""
    run = uuid.uuid4().hex[:6]
    with open(tmp_path / "faststream.log", "ab") as sink:
        service = subprocess.Popen(
            [FASTSTREAM, "run", "examples.refund.service:app"], env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
        )
    client = await nats.connect(env["NATS_URL"])
    collector = Collector()
    try:
        await client.subscribe("emails.refund.extracted", cb=collector.on_result)
        js = client.jetstream()
        async with asyncio.timeout(60):
            while not any(r["event_id"] == f"{run}-fs" for r in collector.results):
                assert service.poll() is None, (tmp_path / "faststream.log").read_text()
                await js.publish("emails.refund", json.dumps(email(f"{run}-fs")).encode())
                await asyncio.sleep(1.0)
    finally:
        await client.close()
        stop_service(service)
    [answer] = [r for r in collector.results if r["event_id"] == f"{run}-fs"][:1]
    assert answer["handler"] == "refund" and answer["result"]["order_id"] == "A-1001"


async def test_one_app_serves_the_classifier_and_the_refund_handler(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, providers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    """examples.together: both handlers answer, each through its own policy section, and the report has a section
    per handler; an event id both handlers see is answered by each, never from the other's stored result."""
    module = load("examples.together", env, monkeypatch)
    primary, backup = providers
    backup.answer = None  # the classifier's model: answers a TaskClassification
    client = await nats.connect(env["NATS_URL"])
    collector = Collector()
    shared_id = f"{uuid.uuid4().hex[:6]}-both"
    try:
        await client.subscribe("tasks.classified", cb=collector.on_result)
        await client.subscribe("emails.refund.extracted", cb=collector.on_result)
        async with module.app:
            js = client.jetstream()
            await js.publish("emails.refund", json.dumps(email(shared_id)).encode())
            await collector.wait_for(results=1)
            await js.publish("tasks.classify", json.dumps({"id": shared_id, "text": "the export crashes"}).encode())
            await collector.wait_for(results=2)
            replicas = await gather(client, wait_s=0.5)
    finally:
        await client.close()
    by_handler = {r["handler"]: r for r in collector.results if r["event_id"] == shared_id}
    assert set(by_handler) == {"classify", "refund"}
    assert by_handler["refund"]["model"] == "primary" and by_handler["refund"]["result"]["order_id"] == "A-1001"
    assert by_handler["classify"]["model"] == "backup" and by_handler["classify"]["result"]["category"] == "bug"
    handlers = {(r.handler, r.subject) for r in replicas}
    assert {("classify", "tasks.classify"), ("refund", "emails.refund")} <= handlers
    assert (primary.count, backup.count) == (1, 1)


class Order(BaseModel):
    order_id: str
    paid_eur: float


class Lookup(BaseModel):
    order_id: str
    refundable_eur: float


class Ask(BaseModel):
    id: str
    order_id: str


async def test_an_agent_with_a_tool_and_deps_takes_agent_run_with_usage_and_cost(server: EmbeddedNats) -> None:
    """An agent with a function tool and per-event deps runs agent.run through the whole stack: the tool is called
    with the event's deps, and both model requests' tokens and cost are in the envelope."""
    orders = {"A-1": Order(order_id="A-1", paid_eur=40.0)}
    lookup_agent: Agent[dict[str, Order], Lookup] = Agent(output_type=Lookup, deps_type=dict, name="lookup")
    looked_up: list[str] = []

    @lookup_agent.tool
    def find_order(ctx: RunContext[dict[str, Order]], order_id: str) -> float:
        looked_up.append(order_id)
        return ctx.deps[order_id].paid_eur

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        usage = RequestUsage(input_tokens=100, output_tokens=10)
        returned = [p for m in messages for p in getattr(m, "parts", []) if isinstance(p, ToolReturnPart)]
        if not returned:
            return ModelResponse(parts=[ToolCallPart("find_order", {"order_id": "A-1"}, "c1")], usage=usage)
        paid = float(str(returned[0].content))
        output = {"order_id": "A-1", "refundable_eur": paid}
        [tool] = info.output_tools
        return ModelResponse(parts=[ToolCallPart(tool.name, output, "c2")], usage=usage)

    policy = Policy.model_validate(
        {
            "models": [
                {"name": "fn", "model": "openai-chat:fn", "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0}
            ]
        }
    )
    target = ModelTarget(
        model=FunctionModel(model, model_name="fn"),
        output=output_spec(Lookup, "tool"),
        output_retries=1,
        price_input_per_mtok=1.0,
        price_output_per_mtok=2.0,
    )
    run = uuid.uuid4().hex[:6]
    broker = NatsBroker(server.url)
    reliable = Stanchion(broker, settings=Settings(nats_url=server.url), policy=policy)

    @reliable.agent(
        f"t.{run}.lookup",
        name=f"lookup-{run}",
        agent=lookup_agent,
        deps=lambda ask: orders,
        candidates={"fn": Candidate("fn", target)},
    )
    def ask_prompt(ask: Ask) -> str:
        return f"How much of order {ask.order_id} can be refunded?"

    client = await nats.connect(server.url)
    collector = Collector()
    try:
        await client.subscribe(f"t.{run}.lookup.results", cb=collector.on_result)
        async with reliable.app():
            await client.jetstream().publish(f"t.{run}.lookup", json.dumps({"id": "q1", "order_id": "A-1"}).encode())
            await collector.wait_for(results=1)
    finally:
        await client.close()
    [envelope] = collector.results
    assert envelope["result"] == {"order_id": "A-1", "refundable_eur": 40.0}
    assert looked_up == ["A-1"]
    assert envelope["usage"] == {"input_tokens": 200, "output_tokens": 20, "requests": 2}
    assert envelope["cost_usd"] == pytest.approx((200 * 1.0 + 20 * 2.0) / 1_000_000)
    terminal = ask_prompt.terminal
    assert isinstance(terminal, AgentTerminal)
    assert (terminal.agent_runs, terminal.fast_requests) == (1, 0)
