"""Comparisons that run the code under test inside the benchmark process: reference points, overhead, agent path.

The "same agent" is pydantic-ai with an instant ``FunctionModel`` in this process: these comparisons measure
what the stack, the service and FastStream add, and an HTTP client plus a provider process would only add
the same cost to both sides (the HTTP path is measured by the concurrency comparison).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import inspect
import io
import pstats
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import nats
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StorageType
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from pydantic_ai import Agent

from bench import bench_stack
from bench.bench_stack import POLICY, instant_candidate
from bench.harness import ROOT, Lane, Report, interleave, lane_settings, median, provider, spread
from stanchion.contracts import ResultEnvelope, TaskClassification, TaskEvent, Usage
from stanchion.handlers.classify.agent import build_agent, prompt
from stanchion.handlers.classify.app import create_app
from stanchion.handlers.models.providers import ModelTarget, build_candidates, close_models
from stanchion.handlers.models.terminal import AgentTerminal
from stanchion.handlers.nats.broker import create_broker, raw_body
from stanchion.handlers.nats.streams import max_ack_pending, pull_batch
from stanchion.handlers.observability.logs import configure_logging
from stanchion.handlers.policy import ModelConfig
from stanchion.handlers.runtime.results import InMemoryResultStore
from stanchion.handlers.settings import Settings
from stanchion.middleware import Call, Candidate, Terminal
from tests.otlp_receiver import OtlpReceiver


class NaiveAgentTerminal:
    """``AgentTerminal`` as it was before the agent-path work: one plain ``agent.run`` per attempt."""

    def __init__(self, agent: Agent[None, TaskClassification] | None = None) -> None:
        self.agent = agent or build_agent()

    async def __call__(self, call: Call) -> TaskClassification:
        if call.candidate is None or not isinstance(call.candidate.target, ModelTarget):
            raise TypeError("NaiveAgentTerminal needs call.candidate.target to be a ModelTarget")
        target: ModelTarget[TaskClassification] = call.candidate.target
        call.attempts += 1
        result: Any = await self.agent.run(
            prompt(call.event),
            model=target.model,
            output_type=target.output,
            retries={"output": target.output_retries},
        )
        run_usage = result.usage
        usage = Usage(
            input_tokens=run_usage.input_tokens, output_tokens=run_usage.output_tokens, requests=run_usage.requests
        )
        reported = float(run_usage.cost) if getattr(run_usage, "cost", None) is not None else None
        call.add_usage(usage, target.cost(usage, reported))
        output: TaskClassification = result.output
        return output


def quiet_logging(directory: Path) -> None:
    """The service's logging as in production (info, JSON), written to a file instead of the terminal."""
    configure_logging("info", "json", (), stream=open(directory / "inproc.log", "a"))  # noqa: SIM115 - lives as long as the process


# -- reference points -----------------------------------------------------------------------------


async def _prepublish(client: Client, stream: str, subject: str, n: int) -> None:
    """A fresh stream holding ``n`` TaskEvents."""
    js = client.jetstream()
    await js.add_stream(name=stream, subjects=[subject], storage=StorageType.FILE)
    for _, data in Lane.payloads(stream, n):
        await client.publish(subject, data)
    await client.flush()
    while (await js.stream_info(stream)).state.messages < n:  # noqa: ASYNC110 - polling the server
        await asyncio.sleep(0.05)


async def raw_consumer(url: str, n: int) -> float:
    """nats-py alone: a pull consumer fetching batches and acking every message."""
    client = await nats.connect(url)
    try:
        settings = lane_settings(url)
        await _prepublish(client, settings.input_stream, settings.input_subject, n)
        sub = await client.jetstream().pull_subscribe(settings.input_subject, durable=settings.durable)
        got = 0
        started = time.perf_counter()
        while got < n:
            for msg in await sub.fetch(batch=256, timeout=5):
                await msg.ack()
                got += 1
        rate = n / (time.perf_counter() - started)
        await client.jetstream().delete_stream(settings.input_stream)
        return rate
    finally:
        await client.close()


async def faststream_consumer(url: str, n: int, receiver: OtlpReceiver | None) -> float:
    """A FastStream JetStream subscriber with a typed ``TaskEvent`` handler (and telemetry when a receiver is given)."""
    client = await nats.connect(url)
    settings = lane_settings(url)
    await _prepublish(client, settings.input_stream, settings.input_subject, n)
    tracer_provider: TracerProvider | None = None
    middlewares: list[Any] = []
    if receiver is not None:
        tracer_provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        )
        middlewares = [NatsTelemetryMiddleware(tracer_provider=tracer_provider)]
    broker = NatsBroker(url, middlewares=middlewares, logger=None)
    stamps: list[float] = []
    done = asyncio.Event()

    @broker.subscriber(
        settings.input_subject,
        stream=JStream(settings.input_stream, subjects=[settings.input_subject], storage=StorageType.FILE),
        durable=settings.durable,
        pull_sub=PullSub(batch_size=64, timeout=1.0),
    )
    async def handle(event: TaskEvent) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= n:
            done.set()

    try:
        await broker.start()
        await asyncio.wait_for(done.wait(), 300)
        return (n - 1) / (stamps[-1] - stamps[0])
    finally:
        await broker.stop()
        if tracer_provider is not None:
            tracer_provider.shutdown()
        await client.jetstream().delete_stream(settings.input_stream)
        await client.close()


async def reference_points(url: str, *, quick: bool) -> Report:
    report = Report(
        "Reference points",
        "Consumption of pre-published TaskEvents from a JetStream stream on the suite's nats-server, in the "
        "benchmark process. raw: nats-py pull consumer, fetch(256), ack each. FastStream: a pull subscriber "
        "(batch 64) with a typed `TaskEvent` handler that does nothing, acked by FastStream. +telemetry: the same "
        "with `NatsTelemetryMiddleware` and a tracer provider exporting over OTLP/HTTP (BatchSpanProcessor) to "
        "the test `OtlpReceiver`, which runs in a thread of this process. Rate = messages / time from the first "
        "to the last handled message.",
    )
    rounds = 2 if quick else 3
    sizes = (20_000, 4_000, 2_000) if quick else (50_000, 10_000, 5_000)
    with OtlpReceiver() as receiver:
        values = await interleave(
            [
                ("raw nats-py", lambda: raw_consumer(url, sizes[0])),
                ("FastStream", lambda: faststream_consumer(url, sizes[1], None)),
                ("FastStream+telemetry", lambda: faststream_consumer(url, sizes[2], receiver)),
            ],
            rounds,
        )
        spans = len(receiver.snapshot())
    reference = {"raw nats-py": "≈ 57k", "FastStream": "≈ 6.1k", "FastStream+telemetry": "≈ 2.4k"}
    for name, vals in values.items():
        report.add(
            f"{name} consumer (msg/s)",
            f"{median(vals):,.0f}",
            detail=f"rounds [{spread(vals)}]; issue's reference {reference[name]}",
        )
    report.notes.append(f"{spans} spans reached the OTLP receiver during the telemetry rounds.")
    return report


# -- 1: overhead ----------------------------------------------------------------------------------


def bare_app(settings: Settings, candidate: Candidate, terminal: Terminal[TaskClassification]) -> NatsBroker:
    """A FastStream handler with the app's subscriber settings calling the agent terminal directly.

    It validates the event, runs the terminal, publishes the result envelope (JetStream-confirmed, with
    Nats-Msg-Id) and acks — the transport work the full app does, without stack, result store or logs.
    """
    broker = create_broker(settings)
    results = broker.publisher(
        settings.output_subject,
        stream=JStream(
            settings.output_stream,
            subjects=[settings.output_subject],
            duplicate_window=settings.dedup_window_s,
            storage=StorageType.FILE,
        ),
    )

    @broker.subscriber(
        settings.input_subject,
        stream=JStream(settings.input_stream, subjects=[settings.input_subject], storage=StorageType.FILE),
        durable=settings.durable,
        pull_sub=PullSub(batch_size=pull_batch(settings), timeout=1.0),
        config=ConsumerConfig(durable_name=settings.durable, max_ack_pending=max_ack_pending(settings)),
        max_workers=settings.max_in_flight,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_body,
    )
    async def classify(body: bytes) -> None:
        # As the app does: the message from FastStream's context (a `msg` parameter costs a worker-thread hop).
        msg: NatsMessage = broker.context.get_local("message")
        started = time.perf_counter()
        event = TaskEvent.model_validate_json(body)
        call = Call(event=event, subject=settings.input_subject, headers=dict(msg.headers), timeout=60.0)
        call.candidate = candidate
        output = await terminal(call)
        envelope = ResultEnvelope[TaskClassification](
            event_id=event.id,
            result=output,
            model=candidate.name,
            attempts=call.attempts,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            usage=call.usage,
        )
        await results.publish(
            envelope.model_dump_json().encode(),
            headers={"Nats-Msg-Id": envelope.event_id, "content-type": "application/json"},
        )
        await msg.ack()

    return broker


async def overhead(url: str, directory: Path, *, quick: bool) -> Report:
    report = Report(
        "1. Overhead: full stack vs bare FastStream handler",
        "Both variants consume from JetStream through FastStream in the benchmark process, with the same "
        "subscriber settings (pull batch 8, 16 workers, manual ack) and publish a JetStream-confirmed result "
        "envelope. The agent is the classifier's `AgentTerminal` with an instant `FunctionModel` (in-process, so "
        "the comparison is not diluted by an HTTP client and a provider). **full** = the classifier app of "
        "`classify.create_app`, declared on the public API (`Stanchion(broker).agent(...)`): the generic handler "
        "(`MessageLoop` around `HandlerRuntime`), Route → Fallback → Retry → CircuitBreaker → Observe → Timeout, "
        "the NATS KV result store, heartbeats, info logs (JSON, to a file), its stats service. **bare** = a "
        "FastStream handler that validates the event, calls the `AgentTerminal` the full app declared and "
        "publishes (taking the message from FastStream's context, as the app does). **over HTTP**: the same pair "
        "with the model on the fake OpenAI-compatible provider (no latency, its own process), as the service runs "
        "it. Bursts of fresh events; rate = events / (first publish → last result). The in-process row is "
        "`bench/bench_stack.py` (`HandlerRuntime.handle` of the declared handler, result store in memory, no NATS).",
    )
    quiet_logging(directory)
    n, rounds = (400, 3) if quick else (1000, 5)
    candidate = instant_candidate()
    full_settings = lane_settings(url, max_in_flight=16)
    full, full_handler = create_app(full_settings, POLICY, url=url, candidates={"fast": candidate})
    # Diagnostic: the same app with the result store in this process instead of NATS KV.
    local_settings = lane_settings(url, max_in_flight=16)
    local, _ = create_app(
        local_settings, POLICY, url=url, results=InMemoryResultStore(), candidates={"fast": candidate}
    )
    bare_settings = lane_settings(url, max_in_flight=16)
    bare = bare_app(bare_settings, candidate, full_handler.terminal)
    client = await nats.connect(url)
    try:
        async with contextlib.AsyncExitStack() as stack:
            # The same pair with the agent on the fake provider over HTTP (its own process), as the service runs it:
            # the candidate built as the public API builds a policy's models, shared by both (the caller closes it).
            base_url = stack.enter_context(provider(0.0))
            http_candidates = build_candidates(
                [ModelConfig(name="fast", model="openai-chat:gpt-4o-mini", base_url=base_url)],
                TaskClassification,
                attempt_timeout_s=20.0,
                output_retries=1,
            )
            stack.push_async_callback(close_models, list(http_candidates.values()))
            http_full_settings = lane_settings(url, max_in_flight=16)
            http_full, http_handler = create_app(http_full_settings, POLICY, url=url, candidates=http_candidates)
            http_bare_settings = lane_settings(url, max_in_flight=16)
            http_bare = bare_app(http_bare_settings, http_candidates["fast"], http_handler.terminal)
            for app in (full, bare, local, http_full, http_bare):
                await app.start()
                stack.push_async_callback(app.stop)
            full_lane = await Lane(client, full_settings).start()
            bare_lane = await Lane(client, bare_settings).start()
            local_lane = await Lane(client, local_settings).start()
            http_full_lane = await Lane(client, http_full_settings).start()
            http_bare_lane = await Lane(client, http_bare_settings).start()
            for lane in (full_lane, bare_lane, local_lane, http_full_lane, http_bare_lane):
                await lane.ready()
                await lane.burst(200)  # warm-up
            values = await interleave(
                [
                    ("bare", lambda: bare_lane.burst(n)),
                    ("full", lambda: full_lane.burst(n)),
                    ("full, results in memory", lambda: local_lane.burst(n)),
                    ("bare over HTTP", lambda: http_bare_lane.burst(n)),
                    ("full over HTTP", lambda: http_full_lane.burst(n)),
                ],
                rounds,
            )
    finally:
        await client.close()
    for handler in (full_handler, http_handler):
        terminal = handler.terminal
        if isinstance(terminal, AgentTerminal) and terminal.agent_runs:
            report.notes.append(
                f"The declared `AgentTerminal`{' over HTTP' if handler is http_handler else ''} (full and bare call "
                f"it) ran `agent.run` for {terminal.agent_runs} of {terminal.fast_requests + terminal.agent_runs} "
                "calls; the rest took its fast path."
            )
    ratio = median(values["full"]) / median(values["bare"])
    report.add("bare FastStream handler (events/s)", f"{median(values['bare']):.0f}", detail=spread(values["bare"]))
    report.add("full stack via create_app (events/s)", f"{median(values['full']):.0f}", detail=spread(values["full"]))
    report.add("ratio full / bare (through NATS)", f"{ratio:.3f}", "≥ 0.95", ratio >= 0.95)
    local_rate = median(values["full, results in memory"])
    report.add(
        "diagnostic: full, result store in memory instead of NATS KV (events/s)",
        f"{local_rate:.0f}",
        detail=f"{spread(values['full, results in memory'])}; ratio to bare {local_rate / median(values['bare']):.3f}",
    )

    if ratio < 0.95:
        kv_share = (local_rate - median(values["full"])) / max(median(values["bare"]) - median(values["full"]), 1e-9)
        report.notes.append(
            f"Missed through NATS: the diagnostic row puts {min(max(kv_share, 0.0), 1.0):.0%} of the gap on the NATS "
            "KV result store (a get before and a confirmed put after every answer, each a JetStream round trip, and "
            "the unconfirmed published mark); the rest is the middleware stack, the heartbeat timer and the info log "
            "lines (one per event, one per model call). With a fast terminal the agent no longer hides them: see "
            "the in-process ratio and its profiles below. With the agent over HTTP the same fixed costs are a "
            "smaller share of each event."
        )
    http_ratio = median(values["full over HTTP"]) / median(values["bare over HTTP"])
    report.add(
        "bare handler, agent over HTTP (events/s)",
        f"{median(values['bare over HTTP']):.0f}",
        detail=spread(values["bare over HTTP"]),
    )
    report.add(
        "full stack, agent over HTTP (events/s)",
        f"{median(values['full over HTTP']):.0f}",
        detail=spread(values["full over HTTP"]),
    )
    report.add("ratio full / bare, agent over HTTP", f"{http_ratio:.3f}", "≥ 0.95", http_ratio >= 0.95)
    full_runtime, bare_runtime = bench_stack.runtimes()
    await bench_stack.throughput(full_runtime, 200)
    await bench_stack.throughput(bare_runtime, 200)
    inproc = await interleave(
        [
            ("handle bare", lambda: bench_stack.throughput(bare_runtime, n)),
            ("handle full", lambda: bench_stack.throughput(full_runtime, n)),
        ],
        rounds,
    )
    in_ratio = median(inproc["handle full"]) / median(inproc["handle bare"])
    report.add(
        "ratio full / bare in-process (`HandlerRuntime.handle`)",
        f"{in_ratio:.3f}",
        "≥ 0.95",
        in_ratio >= 0.95,
        f"bare {median(inproc['handle bare']):.0f}/s, full {median(inproc['handle full']):.0f}/s",
    )
    return report


# -- 6: agent path --------------------------------------------------------------------------------


async def terminal_rate(terminal: Callable[[Call], Awaitable[TaskClassification]], n: int) -> tuple[float, float]:
    """(events/s, CPU ms per event) for ``n`` terminal calls by 16 concurrent workers."""
    candidate = instant_candidate()
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            call = Call(event=TaskEvent(id=f"a-{i}", text=f"the app crashes on login {i}"), timeout=60.0)
            call.candidate = candidate
            await terminal(call)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n * 1000


OURS = ("handlers", "middleware", "contracts", "bench")
"""Top-level packages of this repository (imported as ``stanchion.<name>``, except ``bench``)."""


def _ours(file: str) -> tuple[str, ...] | None:
    """A file of this repository as its path from the package root (``handlers/runtime/handler.py``), else ``None``.

    The packages are imported through ``src/stanchion``'s links, so a frame's file may be either path.
    """
    parts = Path(file).parts
    if "site-packages" in parts:
        return None
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in OURS and (i == 0 or parts[i - 1] in ("stanchion", ROOT.name)):
            return parts[i:]
    return None


def _package(file: str) -> str:
    """The package a profiled frame belongs to: ours, site-packages' top level, the stdlib module, or builtins."""
    path = Path(file)
    if (own := _ours(file)) is not None:
        return own[0]
    if "site-packages" in path.parts:
        return path.parts[path.parts.index("site-packages") + 1].removesuffix(".py")
    if file.startswith("~") or file.startswith("<"):
        return "(builtins)"
    if "python3" in file and "site-packages" not in file:
        return f"stdlib {path.parts[-2] if path.parent.name not in ('python3.11', 'python3.12') else path.stem}"
    return path.parts[-2] if len(path.parts) > 1 else path.stem


def _where(file: str) -> str:
    """Where a profiled function is: our files from the package root, others by their last two path parts."""
    own = _ours(file)
    return "/".join(own if own is not None else Path(file).parts[-2:])


LOGGING_FILES = ("handlers/observability/logs.py", "handlers/runtime/redact.py")


def profile_summary(run: Callable[[], Coroutine[Any, Any, Any]], n: int, top: int = 8) -> str:
    """Where the CPU of ``n`` events goes under cProfile: own time by package, and the functions with the most."""
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(run())
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    by_package: dict[str, float] = {}
    for (file, _, _), (_, _, own, _, _) in raw.items():
        by_package[_package(file)] = by_package.get(_package(file), 0.0) + own
    packages = sorted(by_package.items(), key=lambda kv: kv[1], reverse=True)[:top]
    lines = [
        "  - own time by package: "
        + ", ".join(f"{name} {own / total:.0%}" for name, own in packages)
        + f" (profiled total {total / n * 1000:.2f} ms per event)"
    ]
    logging_own = sum(
        own
        for (file, _, _), (_, _, own, _, _) in raw.items()
        if _package(file) in ("structlog", "stdlib logging") or _where(file) in LOGGING_FILES
    )
    if logging_own / total >= 0.02:
        lines.append(
            f"  - logging (structlog, logging, `{LOGGING_FILES[0]}` and redaction): {logging_own / total:.0%} "
            f"({logging_own / n * 1000:.2f} ms per event under the profiler)"
        )
    for (file, line, func), (_, calls, own, cumulative, _) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(
            f"  - `{func}` ({_where(file)}:{line}): {own / total:.0%} own time, {cumulative / n * 1000:.2f} ms "
            f"cumulative per event, {calls / n:.0f} calls per event"
        )
    return "\n".join(lines)


def current_terminal() -> Terminal[TaskClassification]:
    """The terminal the public API declares for the classifier (``Stanchion.agent`` via ``classify.create_app``)."""
    return bench_stack.offline_handler(instant_candidate()).terminal


def path_counts(terminal: Terminal[TaskClassification]) -> str:
    if not isinstance(terminal, AgentTerminal):
        return f"the declared terminal is a {type(terminal).__name__}, not an AgentTerminal"
    calls = terminal.fast_requests + terminal.agent_runs
    return f"{terminal.fast_requests} of {calls} calls took the fast path, {terminal.agent_runs} ran `agent.run`"


async def agent_path(*, quick: bool) -> Report:
    report = Report(
        "6. Agent path: naive agent.run vs current AgentTerminal",
        "The terminal alone, 16 concurrent callers, instant `FunctionModel`, in the benchmark process. **naive** = "
        "`bench.inproc.NaiveAgentTerminal`, a copy of `AgentTerminal` before the agent-path work (one "
        "`agent.run` per attempt); **current** = the terminal the public API declares for the classifier "
        "(`classify.create_app` → `Stanchion.agent`: the generic `AgentTerminal` of "
        "`handlers/models/terminal.py` on the classifier's agent and prompt) as it is in the tree. Both get the "
        "same candidate (`ModelTarget`, tool output). CPU per event = process CPU time / events.",
    )
    n, rounds = (300, 3) if quick else (1000, 5)
    naive, current = NaiveAgentTerminal(), current_terminal()
    await terminal_rate(naive, 100)
    await terminal_rate(current, 100)
    cpu: dict[str, list[float]] = {"naive": [], "current": []}

    async def run(name: str, terminal: Callable[[Call], Awaitable[TaskClassification]]) -> float:
        rate, ms = await terminal_rate(terminal, n)
        cpu[name].append(ms)
        return rate

    values = await interleave(
        [("naive", lambda: run("naive", naive)), ("current", lambda: run("current", current))], rounds
    )
    speedup = median(values["current"]) / median(values["naive"])
    if speedup < 3.0:
        source = inspect.getsource(AgentTerminal)
        if "self.agent.run(" in source and "model_request" not in source:
            report.notes.append(
                "Missed: `AgentTerminal` in the tree still makes one plain `agent.run` per event (the rewrite had "
                "not landed when this ran), so both sides run the same code."
            )
        else:
            report.notes.append("Missed: see the profiles below for what is left per event in the current path.")
    report.notes.append(f"Current path, warm-up and rounds: {path_counts(current)}.")
    report.add("naive agent.run (events/s)", f"{median(values['naive']):.0f}", detail=spread(values["naive"]))
    report.add("naive: CPU per event (ms)", f"{median(cpu['naive']):.2f}", detail="issue's reference ≈ 6 ms")
    report.add("current AgentTerminal (events/s)", f"{median(values['current']):.0f}", detail=spread(values["current"]))
    report.add("current: CPU per event (ms)", f"{median(cpu['current']):.2f}")
    report.add("speed-up current / naive", f"{speedup:.1f}x", "≥ 3x", speedup >= 3.0)
    return report


def agent_profiles(report: Report, *, quick: bool) -> None:
    """Profiles of both terminals (run outside the event loop of the suite: cProfile wants its own run)."""
    n = 200 if quick else 500
    report.notes.append(
        f"Profile of the naive path (cProfile, {n} events, top functions by own time):\n"
        + profile_summary(lambda: terminal_rate(NaiveAgentTerminal(), n), n)
    )
    report.notes.append(
        "Profile of the current path:\n" + profile_summary(lambda: terminal_rate(current_terminal(), n), n)
    )


def overhead_profiles(report: Report, *, quick: bool) -> None:
    """Where the stack's cost goes: `HandlerRuntime.handle` with the full stack and with none, under cProfile."""
    n = 300 if quick else 1000
    full, bare = bench_stack.runtimes()

    for runtime in (full, bare):  # first calls build caches: keep them out of the profiles
        asyncio.run(bench_stack.throughput(runtime, 200))
    report.notes.append(
        f"Profile of `HandlerRuntime.handle` with the full stack (cProfile, {n} events after a warm-up; "
        "times are inflated by the profiler):\n" + profile_summary(lambda: bench_stack.throughput(full, n), n)
    )
    report.notes.append(
        "The same with no middleware (bare):\n" + profile_summary(lambda: bench_stack.throughput(bare, n), n)
    )
