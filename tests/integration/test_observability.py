"""Logs and the production report of real `stanchion run` processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.settings import Settings
from tests.conftest import (
    STANCHION,
    Collector,
    clean_env,
    service_env,
    start_service,
    stop_service,
    unique_settings,
    wait_for_consumer,
)
from tests.fake_openai import FakeOpenAI
from tests.otlp_receiver import OtlpReceiver

SECRET = "sk-log-test-9f8e7d6c5b4a39281706"

POLICY = """
[[models]]
name = "fast"
model = "openai-chat:gpt-4o-mini"
base_url = "{base_url}"
api_key_env = "OPENAI_API_KEY"

[routes.default]
models = ["fast"]
heuristic = false
"""


async def test_logs_carry_the_trace_one_line_per_model_call_and_never_the_api_key(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """JSON logs: handler lines carry trace_id, span_id, event_id and subject; one `llm_call_completed` per model
    call; the API key, quoted back by a careless provider in its errors, is in no log line, span or dead letter."""
    provider = fake_openai(echo_auth=True)
    provider.set(script=["500", "ok", "401"])  # event 1: fails, retried, answered; event 2: refused for good
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(base_url=provider.base_url))
    settings = unique_settings(nats_server.url)
    with OtlpReceiver() as receiver:
        env = service_env(
            settings,
            OPENAI_API_KEY=SECRET,
            STANCHION_POLICY=str(policy),
            STANCHION_LOG_FORMAT="json",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        service = start_service(env, tmp_path)
        client = await nats.connect(nats_server.url)
        collector = Collector()
        try:
            await client.subscribe(settings.output_subject, cb=collector.on_result)
            await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
            await wait_for_consumer(client, settings, service)
            js = client.jetstream()
            await js.publish(settings.input_subject, json.dumps({"id": "log-1", "text": "the app crashes"}).encode())
            await collector.wait_for(results=1, timeout=30)
            await js.publish(settings.input_subject, json.dumps({"id": "log-2", "text": "add dark mode"}).encode())
            poison = json.dumps({"id": "log-3", "text": 42, "note": f"my key is {SECRET}"}).encode()
            await js.publish(settings.input_subject, poison)
            await collector.wait_for(results=1, dead=2, timeout=30)
        finally:
            await client.close()
            code = stop_service(service)
    assert code == 0
    assert provider.count == 3
    output = (tmp_path / "service.log").read_text()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output[:2000]

    calls = [line for line in lines if line["event"] == "llm_call_completed"]
    assert len(calls) == provider.count
    assert [(c["event_id"], c["attempt"], c["outcome"]) for c in calls] == [
        ("log-1", 1, "transient"),
        ("log-1", 2, "ok"),
        ("log-2", 1, "permanent"),
    ]
    for call in calls:
        assert call["model"] == "openai-chat:gpt-4o-mini" and call["candidate"] == "fast"
        assert {"input_tokens", "output_tokens", "latency_ms", "cost_usd"} <= set(call)
        assert call["latency_ms"] > 0
    assert calls[1]["input_tokens"] > 0 and calls[1]["output_tokens"] > 0

    [result] = collector.results
    handler_lines = [line for line in lines if line.get("event_id") == "log-1"]
    assert len(handler_lines) >= 3
    for line in handler_lines:
        assert line["trace_id"] == result["trace_id"], line
        assert len(line["span_id"]) == 16 and line["subject"] == settings.input_subject, line

    # The provider did quote the key back: the failed call's error is in the logs, masked.
    assert "got Authorization: Bearer ***" in calls[2]["error"]
    failed = next(d for d in collector.dead if d["event_id"] == "log-2")
    assert failed["error_type"] == "failed" and any("Bearer ***" in e for e in failed["errors"])
    poisoned = next(d for d in collector.dead if d["event_id"] == "log-3")
    assert poisoned["payload_redacted"] and "my key is ***" in poisoned["payload"]
    assert SECRET not in output
    assert all(SECRET not in json.dumps(d) for d in collector.dead)
    assert receiver.raw and all(SECRET.encode() not in body for body in receiver.raw)


async def _run_report(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [STANCHION, "report", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_report_gathers_every_replica_and_combines_them(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """Two `stanchion run` processes share one durable; `stanchion report` prints each replica's figures and the
    combined table, whose counts are the sums of the replicas'."""
    provider = fake_openai(latency_s=0.1)
    provider.set(script=["503"])  # one retry somewhere
    settings = unique_settings(nats_server.url)
    env = service_env(
        settings,
        OPENAI_API_KEY=SECRET,
        OPENAI_BASE_URL=provider.base_url,
        STANCHION_MAX_IN_FLIGHT="2",
        STANCHION_REPLICAS="2",
        STANCHION_BUDGET_USD="0.5",
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    replicas = [start_service(env, tmp_path / "a"), start_service(env, tmp_path / "b")]
    client = await nats.connect(nats_server.url)
    collector = Collector()
    ids = [f"report-{i}" for i in range(20)]
    try:
        await client.subscribe(settings.output_subject, cb=collector.on_result)
        for replica in replicas:
            await wait_for_consumer(client, settings, replica)
        await asyncio.sleep(0.5)  # both replicas pulling
        for event_id in ids:
            event = {"id": event_id, "text": "the export crashes"}
            await client.jetstream().publish(settings.input_subject, json.dumps(event).encode())
        await collector.wait_for(results=len(ids), timeout=60)
        as_json = await _run_report(env, "--json")
        as_text = await _run_report(env)
    finally:
        await client.close()
        codes = [stop_service(replica) for replica in replicas]
    assert codes == [0, 0]
    assert as_json.returncode == 0, as_json.stderr
    figures: dict[str, Any] = json.loads(as_json.stdout)
    per_replica = figures["replicas"]
    assert sorted(r["pid"] for r in per_replica) == sorted(p.pid for p in replicas)
    assert all(r["answered"] > 0 for r in per_replica), [r["answered"] for r in per_replica]
    combined = figures["combined"]
    assert combined["replicas"] == 2
    assert combined["answered"] == sum(r["answered"] for r in per_replica) == len(ids)
    fast = combined["models"]["fast"]
    assert fast["calls"] == sum(r["models"]["fast"]["calls"] for r in per_replica) == provider.count == len(ids) + 1
    assert fast["ok"] == len(ids) and fast["errors"] == {"transient": 1}
    assert combined["retries"] == 1
    assert fast["latency"]["count"] == len(ids) + 1
    envelope_cost = sum(r["cost_usd"] or 0.0 for r in collector.results)
    assert abs(fast["cost_usd"] - envelope_cost) < 1e-9
    assert figures["budget_usd"] == 0.5

    assert as_text.returncode == 0, as_text.stderr
    text = as_text.stdout
    for replica in replicas:
        assert f"pid {replica.pid}" in text
    assert "combined: 2 replicas" in text
    assert text.count("p50/p95/p99 ms") == 3  # two replicas and the combined table
    assert "budget" in text and "$0.5 budget" in text
    assert "success 100.0%" in text.split("combined:")[1]


async def test_report_finds_a_service_whatever_its_durable_and_prints_its_names_whole_at_80_columns(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """A service with a renamed durable and long model names; `stanchion report` run with none of its names, with
    an unrelated bad service setting, at 80 columns: finds it, and prints every name whole."""
    provider = fake_openai()
    long_name = "smol-native-json-schema-primary"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[[models]]\nname = "{long_name}"\nmodel = "openai-chat:SmolLM2-135M-Instruct-Q8_0"\n'
        f'base_url = "{provider.base_url}"\noutput_mode = "native"\n'
    )
    settings = unique_settings(nats_server.url)
    env = service_env(settings, STANCHION_POLICY=str(policy))
    service = start_service(env, tmp_path)
    client = await nats.connect(nats_server.url)
    collector = Collector()
    try:
        await client.subscribe(settings.output_subject, cb=collector.on_result)
        await wait_for_consumer(client, settings, service)
        for i in range(3):
            event = {"id": f"renamed-{i}", "text": "the export crashes"}
            await client.jetstream().publish(settings.input_subject, json.dumps(event).encode())
        await collector.wait_for(results=3, timeout=60)
        report_env = clean_env(NATS_URL=nats_server.url, STANCHION_MAX_IN_FLIGHT="abc", COLUMNS="80")
        proc = await asyncio.to_thread(
            subprocess.run, [STANCHION, "report"], env=report_env, capture_output=True, text=True, timeout=60
        )
    finally:
        await client.close()
        stop_service(service)
    assert settings.durable != Settings().durable  # renamed: the report was given none of the service's names
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"handler classify ({settings.input_subject})" in text
    words = {word.strip("(),:;") for word in text.split()}
    assert {long_name, "openai-chat:SmolLM2-135M-Instruct-Q8_0"} <= words, text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert f"{long_name} (openai-chat:SmolLM2-135M-Instruct-Q8_0): 3 calls" in " ".join(text.split())
