"""The ``stanchion`` command and FastStream's CLI, run as a user would: in a subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from stanchion.handlers.nats.embedded import EmbeddedNats
from stanchion.handlers.policy import load_policy
from tests.conftest import (
    ROOT,
    STANCHION,
    Collector,
    clean_env,
    policy_for,
    running_service,
    service_env,
    start_service,
    stop_service,
    unique_settings,
    wait_for_consumer,
)
from tests.fake_openai import FakeOpenAI

FASTSTREAM = str(Path(sys.executable).parent / "faststream")
SECRET = "sk-test-0123456789abcdef-secret"


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_demo_answers_every_sample_with_the_heuristic_and_leaves_no_server(tmp_path: Path) -> None:
    """Quickstart: with no keys and no NATS_URL, the demo prints one degraded row per sample, exits 0, cleans up."""
    store = tmp_path / "demo-store"
    env = clean_env(STANCHION_NATS_STORE_DIR=str(store))
    proc = subprocess.run([STANCHION, "demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "demo-" in line]
    assert len(rows) == 10
    assert all("heuristic" in row and "true" in row for row in rows)
    assert "10/10 answered" in proc.stdout
    assert "Traceback" not in proc.stderr and "[error" not in proc.stderr, proc.stderr  # no fault was injected
    assert processes_mentioning(str(store)) == []


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"STANCHION_POLICY": "/nonexistent/policy.toml"}, "STANCHION_POLICY"),
        ({"STANCHION_MAX_IN_FLIGHT": "lots"}, "STANCHION_MAX_IN_FLIGHT"),
        ({"STANCHION_PROFILE": "staging"}, "STANCHION_PROFILE"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXEMPLAR_FILTER": "sometimes"},
            "OTEL_METRICS_EXEMPLAR_FILTER",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_naming_it(env: dict[str, str], names: str, tmp_path: Path) -> None:
    """A bad setting exits non-zero with one line naming it, and no traceback."""
    proc = subprocess.run(
        [STANCHION, "run"], env=clean_env(**env), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unknown_output_mode_in_the_policy_stops_start_up(tmp_path: Path) -> None:
    """A policy file with an unknown output_mode is refused at start-up, naming the key."""
    policy = tmp_path / "policy.toml"
    policy.write_text((ROOT / "examples/policy.toml").read_text().replace('"native"', '"json"'))
    proc = subprocess.run(
        [STANCHION, "run"],
        env=clean_env(STANCHION_POLICY=str(policy)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "models.1.output_mode" in proc.stderr and "STANCHION_POLICY" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


async def test_stanchion_run_answers_events_from_a_plain_client(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """`stanchion run` with OPENAI_API_KEY/OPENAI_BASE_URL answers 20 events, keeps the key out of its logs, and
    stops cleanly on SIGTERM."""
    provider = fake_openai()
    settings = unique_settings(nats_server.url)
    env = service_env(settings, OPENAI_API_KEY=SECRET, OPENAI_BASE_URL=provider.base_url, STANCHION_LOG_FORMAT="json")
    log = tmp_path / "service.log"
    service = start_service(env, tmp_path)
    client = await nats.connect(nats_server.url)
    collector = Collector()
    try:
        await client.subscribe(settings.output_subject, cb=collector.on_result)
        await wait_for_consumer(client, settings, service)
        ids = [f"run-{i}" for i in range(20)]
        for event_id in ids:
            await client.publish(settings.input_subject, json.dumps({"id": event_id, "text": "app crashes"}).encode())
        await collector.wait_for(results=20, timeout=60)
    finally:
        await client.close()
        code = stop_service(service)
    assert code == 0
    assert sorted(r["event_id"] for r in collector.results) == sorted(ids)
    assert {r["model"] for r in collector.results} == {"fast"}
    assert not any(r["degraded"] for r in collector.results)
    assert provider.count == 20
    assert {r.model for r in provider.requests} == {"gpt-4o-mini"}
    output = log.read_text()
    assert "answered" in output
    assert SECRET not in output


async def test_the_policy_file_example_works_as_written(
    nats_server: EmbeddedNats,
    fake_openai: Callable[..., FakeOpenAI],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The README's policy example, unchanged but for its servers' ports (the OS's, never fixed ones): primary
    answers 503, so backup serves."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    primary, backup = fake_openai(always="503"), fake_openai()
    text = (ROOT / "examples/policy.toml").read_text()
    urls = {"http://127.0.0.1:18000/v1": primary.base_url, "http://127.0.0.1:18001/v1": backup.base_url}
    assert all(url in text for url in urls)
    for url, ours in urls.items():
        text = text.replace(url, ours)
    (tmp_path / "policy.toml").write_text(text)
    policy = load_policy(tmp_path / "policy.toml")
    async with running_service(nats_server.url, policy) as svc:
        for i in range(3):
            await svc.publish({"id": f"p-{i}", "text": "please add SSO"})
        await svc.collector.wait_for(results=3)
    assert {r["model"] for r in svc.collector.results} == {"backup"}
    assert primary.count >= 1 and backup.count == 3
    assert all("response_format" in r.body for r in backup.requests)  # backup runs in native output mode
    assert SECRET not in json.dumps(svc.collector.results)


def test_faststream_docs_gen_emits_the_contracts(tmp_path: Path) -> None:
    """`faststream docs gen handlers.app:app` writes an AsyncAPI document with the contracts' schemas."""
    out = tmp_path / "asyncapi.json"
    proc = subprocess.run(
        [FASTSTREAM, "docs", "gen", "stanchion.handlers.classify.app:app", "-o", str(out)],
        cwd=ROOT,
        env=clean_env(NATS_URL="nats://127.0.0.1:4222"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    schemas = json.loads(out.read_text())["components"]["schemas"]
    assert {"TaskEvent", "TaskClassification", "DeadLetter"} <= set(schemas)
    assert any(name.startswith("ResultEnvelope") for name in schemas)


async def test_a_provider_quoting_the_api_key_never_gets_it_into_logs_dead_letters_or_results(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """A provider whose 401 quotes the key it refused: the key appears nowhere in the service's log, its
    dead letter, or (with a heuristic) its result's decisions."""
    provider = fake_openai(always="401", echo_auth=True)
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
[[models]]
name = "primary"
model = "openai-chat:gpt-4o-mini"
base_url = "{provider.base_url}"
api_key_env = "OPENAI_API_KEY"

[routes.default]
models = ["primary"]
heuristic = false

[routes.degraded]
models = ["primary"]
heuristic = true

[[rules]]
route = "degraded"
kinds = ["degrade"]
"""
    )
    settings = unique_settings(nats_server.url)
    env = service_env(settings, OPENAI_API_KEY=SECRET, STANCHION_POLICY=str(policy), STANCHION_LOG_LEVEL="debug")
    log = tmp_path / "service.log"
    service = start_service(env, tmp_path)
    client = await nats.connect(nats_server.url)
    collector = Collector()
    try:
        await client.subscribe(settings.output_subject, cb=collector.on_result)
        await client.subscribe(settings.dlq_subject, cb=collector.on_dead)
        await wait_for_consumer(client, settings, service)
        js = client.jetstream()
        await js.publish(settings.input_subject, json.dumps({"id": "leak-1", "text": "login fails"}).encode())
        await js.publish(
            settings.input_subject, json.dumps({"id": "leak-2", "text": "login fails", "kind": "degrade"}).encode()
        )
        await collector.wait_for(results=1, dead=1, timeout=30)
    finally:
        await client.close()
        stop_service(service)
    assert provider.count == 2
    [dead] = collector.dead
    [result] = collector.results
    assert dead["error_type"] == "failed" and any("401" in e for e in dead["errors"])
    assert result["degraded"] is True
    assert "Authorization" in json.dumps(dead)  # the quoted header is there, masked
    for text in (json.dumps(dead), json.dumps(result), log.read_text()):
        assert SECRET not in text


@pytest.mark.parametrize("command", [[], ["run"], ["publish"], ["demo"], ["dlq"], ["dlq", "list"], ["dlq", "replay"]])
def test_every_command_has_help(command: list[str]) -> None:
    """`--help` works on every command and says what it is for."""
    proc = subprocess.run([STANCHION, *command, "--help"], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


async def test_publish_sends_one_event_or_a_jsonl_file(
    nats_server: EmbeddedNats, fake_openai: Callable[..., FakeOpenAI], tmp_path: Path
) -> None:
    """`stanchion publish` sends one JSON event, or every line of a JSON-lines file; each is answered."""
    provider = fake_openai()
    async with running_service(nats_server.url, policy_for(("primary", provider))) as svc:
        env = clean_env(NATS_URL=nats_server.url)
        subject = svc.settings.input_subject
        one = await asyncio.to_thread(
            subprocess.run,
            [STANCHION, "publish", subject, json.dumps({"id": "pub-0", "text": "one event"})],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert one.returncode == 0, one.stderr
        lines = tmp_path / "events.jsonl"
        lines.write_text("".join(json.dumps({"id": f"pub-{i}", "text": f"event {i}"}) + "\n" for i in range(1, 6)))
        many = await asyncio.to_thread(
            subprocess.run,
            [STANCHION, "publish", subject, "--file", str(lines)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert many.returncode == 0, many.stderr
        assert "published 5 message(s)" in many.stdout and "5 stored by JetStream" in many.stdout
        await svc.collector.wait_for(results=6)
    assert sorted(r["event_id"] for r in svc.collector.results) == [f"pub-{i}" for i in range(6)]


def test_faststream_run_with_a_bad_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    """Under FastStream's own runner, a bad setting stops start-up as `stanchion run` does: one line, exit code 2."""
    env = clean_env(STANCHION_MAX_IN_FLIGHT="lots")
    proc = subprocess.run(
        [FASTSTREAM, "run", "stanchion.handlers.classify.app:app"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "stanchion: configuration error: STANCHION_MAX_IN_FLIGHT" in proc.stderr
    assert "Traceback" not in proc.stderr


CONFIG_ERRORS = [
    ({"STANCHION_NAK_BACKOFF_S": "soon"}, "STANCHION_NAK_BACKOFF_S", "like 2,10,30,60"),
    ({"STANCHION_OUTPUT_MODE": "json"}, "STANCHION_OUTPUT_MODE", "'tool', 'native' or 'prompted'"),
    ({"STANCHION_MAX_IN_FLIGHT": "lots"}, "STANCHION_MAX_IN_FLIGHT", "valid integer"),
    ({"STANCHION_POLICY": "{empty}"}, "STANCHION_POLICY", "defines no [[models]]"),
]


@pytest.mark.parametrize("entry", ["run", "demo", "faststream"])
@pytest.mark.parametrize(("env", "name", "form"), CONFIG_ERRORS, ids=[e[1] for e in CONFIG_ERRORS])
def test_every_entry_point_exits_2_with_one_line_naming_the_setting_and_its_form(
    entry: str, env: dict[str, str], name: str, form: str, tmp_path: Path
) -> None:
    """`stanchion run`, `stanchion demo` and `faststream run`: a bad setting is one line naming it and the expected
    form, exit code 2, no traceback."""
    empty = tmp_path / "empty.toml"
    empty.write_text("# no models\n")
    env = {key: value.replace("{empty}", str(empty)) for key, value in env.items()}
    command = {
        "run": [STANCHION, "run"],
        "demo": [STANCHION, "demo"],
        "faststream": [FASTSTREAM, "run", "stanchion.handlers.classify.app:app"],
    }[entry]
    proc = subprocess.run(command, env=clean_env(**env), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert name in lines[0] and form in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
