"""Shared pieces of the benchmark suite: processes it starts, lanes of events through NATS, figures, the report.

Every comparison runs its variants in one process run, alternating rounds, and compares medians. A *lane*
is one set of subjects, streams and durable: the driver publishes a burst of events with fresh ids to the
lane's input subject and counts the result envelopes that come back on its output subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from stanchion.handlers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
STANCHION = str(Path(sys.executable).parent / "stanchion")
_names = itertools.count()
_rounds = itertools.count()
PIDS: dict[str, int] = {}
"""Helper processes by what they are (a provider by its base URL, ``"nats-server"``), for CPU accounting."""


# -- figures and the report ---------------------------------------------------------------------


@dataclass
class Figure:
    """One line of the results: a measured value, its target (if any) and whether it is met."""

    section: str
    name: str
    value: str
    target: str = ""
    met: bool | None = None
    detail: str = ""

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("met" if self.met else "**missed**")


@dataclass
class Report:
    """Figures and notes of one comparison."""

    title: str
    how: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, name: str, value: str, target: str = "", met: bool | None = None, detail: str = "") -> None:
        self.figures.append(Figure(self.title, name, value, target, met, detail))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def spread(values: Sequence[float]) -> str:
    return "..".join(f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in (min(values), max(values))) if values else ""


def machine(load: tuple[float, float, float]) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
        f"CPython {platform.python_version()}; load average at start {', '.join(f'{x:.2f}' for x in load)}"
    )


@dataclass
class Section:
    """One comparison's part of RESULTS.md: its rows of the summary, its own section, and the run it came from."""

    title: str
    summary: list[str]
    body: list[str]
    """The lines after the section's heading, its footer (seconds and run) last."""
    run: str
    """The date of its run, as the header's list of runs names it."""


_RUN = re.compile(r"^- \*\*(?P<date>[^*]+)\*\*: (?P<text>.*?)(?:; sections: .*)?$")
_FOOTER = re.compile(r"^\((?P<seconds>\d+) s(?:; run of (?P<run>[^)]+))?\)$")


def _section(report: Report, run: str) -> Section:
    summary = [
        f"| {report.title if i == 0 else ''} | {fig.name} | {fig.value} | {fig.target} | {fig.verdict} |"
        for i, fig in enumerate(report.figures)
    ]
    body = ["", report.how, "", "| figure | value | target | | detail |", "|---|---|---|---|---|"]
    body += [f"| {fig.name} | {fig.value} | {fig.target} | {fig.verdict} | {fig.detail} |" for fig in report.figures]
    if report.notes:
        body.append("")
        body += [f"- {note}" for note in report.notes]
    body += ["", f"({report.seconds:.0f} s; run of {run})"]
    return Section(report.title, summary, body, run)


def parse_results(text: str) -> tuple[dict[str, str], list[Section]]:
    """The runs (date → what the header says of it) and sections of a RESULTS.md this module wrote.

    Also reads the older layout with a single run (``- date:``, ``- machine:``, ``- command:``, ``- wall time:``).
    """
    lines = text.splitlines()
    runs: dict[str, str] = {}
    legacy: dict[str, str] = {}
    for line in lines[: next((i for i, x in enumerate(lines) if x.startswith("## ")), len(lines))]:
        if match := _RUN.match(line):
            runs[match["date"]] = match["text"]
        for key in ("date", "machine", "command", "wall time"):
            if line.startswith(f"- {key}: "):
                legacy[key] = line.removeprefix(f"- {key}: ")
    if "date" in legacy:
        wall, _, load = legacy.get("wall time", "").partition("; ")
        runs[legacy["date"]] = (
            f"{legacy.get('command', '')}, wall time {wall.strip()}; machine: {legacy.get('machine', '')}; {load}"
        )
    default_run = legacy.get("date") or next(iter(runs), "an earlier run")
    headings = [i for i, line in enumerate(lines) if line.startswith("## ")]
    sections: list[Section] = []
    summary: dict[str, list[str]] = {}
    for start, end in zip(headings, [*headings[1:], len(lines)], strict=True):
        title, body = lines[start].removeprefix("## "), lines[start + 1 : end]
        while body and not body[-1].strip():
            body.pop()
        if title == "Summary":
            current = ""
            for row in body:
                cells = row.split("|")
                if not row.startswith("| ") or len(cells) < 3 or row.startswith("| comparison |"):
                    continue
                current = cells[1].strip() or current
                summary.setdefault(current, []).append(row)
            continue
        run = default_run
        if body and (footer := _FOOTER.match(body[-1])):
            run = footer["run"] or default_run
            body[-1] = f"({footer['seconds']} s; run of {run})"
        sections.append(Section(title, [], body, run))
    for section in sections:
        section.summary = summary.get(section.title, [])
    return runs, sections


def render(
    reports: Sequence[Report],
    *,
    argv: Sequence[str],
    started: datetime.datetime,
    wall_s: float,
    load: tuple[float, float, float],
    previous: str | None = None,
) -> str:
    """RESULTS.md for ``reports``; with ``previous`` (the file as it was), its other sections are kept as they are,
    each still naming the run it came from, and the sections of ``reports`` replace theirs."""
    date = f"{started:%Y-%m-%d %H:%M} UTC"
    runs = {
        date: f"`{' '.join(['python -m bench.suite', *argv])}`, wall time {wall_s / 60:.1f} min; machine: "
        f"{machine(load)}; load average at the end " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    }
    sections = [_section(report, date) for report in reports]
    if previous is not None:
        old_runs, old_sections = parse_results(previous)
        fresh = {section.title: section for section in sections}
        sections = [fresh.pop(old.title, old) for old in old_sections] + list(fresh.values())
        runs.update({run: text for run, text in old_runs.items() if run != date})
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m bench.suite` (see `bench/suite.py`); do not edit by hand. A run of some of the "
        "comparisons (`--only`) rewrites only their sections; the end of each section names the run it came from.",
        "",
        "Runs, newest first:",
        "",
    ]
    for run, text in runs.items():
        titles = [section.title.split(":")[0] for section in sections if section.run == run]
        if titles:
            lines.append(f"- **{run}**: {text}; sections: {', '.join(titles)}")
    lines += [
        "",
        "Each comparison ran in one process run with its variants interleaved round by round; values are medians",
        "over the rounds (the range of the rounds is in brackets). The machine is shared with other work, so",
        "single rounds are noisy; the ratios of interleaved medians are the figures to read. How busy the machine",
        "was with other work during the ceiling rounds is in the concurrency notes.",
        "",
        "## Summary",
        "",
        "| comparison | figure | value | target | |",
        "|---|---|---|---|---|",
    ]
    for section in sections:
        lines += section.summary
    for section in sections:
        lines += ["", f"## {section.title}", *section.body]
    return "\n".join(lines) + "\n"


def print_report(report: Report) -> None:
    print(f"\n== {report.title} ({report.seconds:.0f} s)", flush=True)
    for fig in report.figures:
        target = f"  target {fig.target}: {fig.verdict.strip('*')}" if fig.target else ""
        print(f"  {fig.name:<58} {fig.value:>22}{target}  {fig.detail}", flush=True)
    for note in report.notes:
        print(f"  - {note}", flush=True)


# -- processes ------------------------------------------------------------------------------------


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """SIGTERM by PID, then SIGKILL if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def provider(latency_s: float = 0.0, always: str = "ok") -> Iterator[str]:
    """The fake OpenAI-compatible provider in its own process; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.provider", "--latency", str(latency_s), "--always", always],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"bench.provider did not start: {line!r}")
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        PIDS[url] = process.pid
        yield url
    finally:
        stop_process(process)


@dataclass
class Collected:
    """What ``bench.collector`` received, filled in when its process stops."""

    endpoint: str
    spans: int = 0
    names: list[str] = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=dict)


@contextmanager
def collector() -> Iterator[Collected]:
    """A real OTLP/HTTP receiver in its own process; yields its endpoint, then what it received."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.collector"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("PORT "):
        stop_process(process)
        raise RuntimeError(f"bench.collector did not start: {line!r}")
    collected = Collected(f"http://127.0.0.1:{int(line.split()[1])}")
    PIDS["collector"] = process.pid
    try:
        yield collected
    finally:
        stop_process(process)
        summary = json.loads(process.stdout.read().decode() or "{}")
        collected.spans = summary.get("spans", 0)
        collected.names = summary.get("names", [])
        collected.metrics = summary.get("metrics", {})


def lane_settings(nats_url: str, **overrides: Any) -> Settings:
    """Settings with subjects, streams, durable and bucket of their own."""
    n = f"{os.getpid()}x{next(_names)}"
    names: dict[str, Any] = {
        "input_subject": f"b{n}.tasks.classify",
        "output_subject": f"b{n}.tasks.classified",
        "dlq_subject": f"b{n}.dlq",
        "input_stream": f"B{n}_TASKS",
        "output_stream": f"B{n}_RESULTS",
        "dlq_stream": f"B{n}_DLQ",
        "durable": f"b{n}-classifier",
        "result_bucket": f"b{n}_results",
        "log_format": "json",  # as in production (the compose file's setting)
    }
    return Settings(nats_url=nats_url, **{**names, **overrides})


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `stanchion run` subprocess for ``settings`` (nothing inherited from ours)."""
    drop = ("NATS_", "OPENAI_", "ANTHROPIC_", "OLLAMA_", "STANCHION_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    names = {
        "NATS_URL": settings.nats_url or "",
        "OLLAMA_BASE_URL": "http://127.0.0.1:9/v1",
        "STANCHION_INPUT_SUBJECT": settings.input_subject,
        "STANCHION_OUTPUT_SUBJECT": settings.output_subject,
        "STANCHION_DLQ_SUBJECT": settings.dlq_subject,
        "STANCHION_INPUT_STREAM": settings.input_stream,
        "STANCHION_OUTPUT_STREAM": settings.output_stream,
        "STANCHION_DLQ_STREAM": settings.dlq_stream,
        "STANCHION_DURABLE": settings.durable,
        "STANCHION_RESULT_BUCKET": settings.result_bucket,
        "STANCHION_MAX_IN_FLIGHT": str(settings.max_in_flight),
        "STANCHION_REPLICAS": str(settings.replicas),
        "STANCHION_LOG_LEVEL": settings.log_level,
        "STANCHION_LOG_FORMAT": settings.log_format,
    }
    return {**env, **names, **extra}


def policy_file(directory: Path, text: str) -> Path:
    path = directory / f"policy-{next(_names)}.toml"
    path.write_text(text)
    return path


def model_policy(base_url: str, *, breaker: str = "", retry: str = "") -> str:
    """A policy TOML: one model on ``base_url``, then the heuristic."""
    return (
        f'[[models]]\nname = "fast"\nmodel = "openai-chat:gpt-4o-mini"\nbase_url = "{base_url}"\n\n'
        f'[routes.default]\nmodels = ["fast"]\nheuristic = true\n{retry}\n{breaker}\n'
    )


@dataclass
class Service:
    """`stanchion run` subprocesses (one per replica) on one lane."""

    settings: Settings
    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(
            line for log in self.logs if log.exists() for line in log.read_text(errors="replace").splitlines()[-lines:]
        )


PY_SPY = Path(sys.executable).parent / "py-spy"


@contextmanager
def services(
    settings: Settings, workdir: Path, *, replicas: int = 1, profile: Path | None = None, **env: str
) -> Iterator[Service]:
    """Start ``replicas`` `stanchion run` processes sharing the lane's durable; stop them by PID after.

    ``profile``: run the (single) service under ``py-spy record`` writing collapsed stacks there; ``pids``
    are then py-spy's, and stopping the service (its child) writes the profile.
    """
    command = [STANCHION, "run"]
    if profile is not None:
        command = [str(PY_SPY), "record", "--gil", "-r", "250", "-f", "raw", "-o", str(profile), "--", *command]
    processes: list[subprocess.Popen[bytes]] = []
    logs = [workdir / f"{settings.durable}-{i}.log" for i in range(replicas)]
    try:
        for path in logs:
            log = open(path, "ab")  # noqa: SIM115 - the child owns it
            processes.append(
                subprocess.Popen(command, env=service_env(settings, **env), cwd=workdir, stdout=log, stderr=log)
            )
            log.close()
        yield Service(settings, processes, logs)
    finally:
        for process in processes:
            stop_process(process)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


PROFILE_GROUPS = (
    ("pydantic-ai agent run", ("(pydantic_ai/", "(pydantic_graph/")),
    ("OpenAI SDK + httpx (HTTP client)", ("(openai/", "(httpx/", "(httpcore/", "(httpx2/", "(httpcore2/", "(h11/")),
    ("HTTP connection pool", ("(httpcore/_async/connection_pool.py", "(httpcore2/_async/connection_pool.py")),
    ("sniffio (async library detection)", ("(sniffio/",)),
    ("genai-prices (cost)", ("(genai_prices/",)),
    ("FastStream", ("(faststream/",)),
    ("nats-py", ("(nats/",)),
    # py-spy names our files from src/ (stanchion/handlers/...), where the editable install puts them on sys.path.
    ("stanchion middleware", ("(stanchion/middleware/", "(middleware/")),
    ("stanchion handlers", ("(stanchion/handlers/", "(handlers/")),
    ("result store (NATS KV)", ("(stanchion/handlers/nats/results.py", "(handlers/nats/results.py", "(nats/js/kv.py")),
    ("logging (structlog, logging)", ("(structlog/", "(logging/")),
    ("pydantic (validation, serialisation)", ("(pydantic/", "(pydantic_core/")),
    ("OpenTelemetry", ("(opentelemetry/",)),
)


def _short(frame: str) -> str:
    """``function (file:line)`` with our files from the package root (``handlers/nats/results.py``), others by their
    last two path parts."""
    function, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if where.startswith("stanchion/"):
        return f"{function} ({where.removeprefix('stanchion/')})"
    return f"{function} ({'/'.join(where.split('/')[-2:])})"


def summarise_profile(path: Path, top: int = 10) -> str:
    """py-spy collapsed stacks as Markdown: share of samples whose stack passes through each group, and the
    functions most often on top of the stack."""
    samples = 0
    inclusive = dict.fromkeys((name for name, _ in PROFILE_GROUPS), 0)
    own: dict[str, int] = {}
    callers: dict[str, dict[str, int]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if "(<frozen importlib._bootstrap>" in stack:
            continue  # start-up imports, not per-event work
        samples += count
        for name, needles in PROFILE_GROUPS:
            if any(needle in stack for needle in needles):
                inclusive[name] += count
        frames = [_short(frame) for frame in stack.split(";")[-3:]]
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + count
        if len(frames) > 1:
            caller = " ← ".join(reversed(frames[:-1]))
            callers.setdefault(leaf, {})
            callers[leaf][caller] = callers[leaf].get(caller, 0) + count
    if not samples:
        return "  - (no samples)"
    lines = [
        "  - share of samples holding the GIL whose stack passes through: "
        + ", ".join(f"{name} {n / samples:.0%}" for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1]))
    ]
    for leaf, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        called = sorted(callers.get(leaf, {}).items(), key=lambda kv: -kv[1])[:2]
        via = "; called from " + ", ".join(f"`{c}` ({k / n:.0%})" for c, k in called) if called else ""
        lines.append(f"  - on top of the stack {n / samples:.1%}: `{leaf}`{via}")
    return "\n".join(lines)


def machine_busy_s() -> float:
    """CPU seconds spent by every process on the machine so far (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stanchion-bench-") as tmp:
        yield Path(tmp)


# -- lanes ----------------------------------------------------------------------------------------


@dataclass
class Received:
    at: float
    envelope: dict[str, Any]


class Lane:
    """Publishes events to one lane and collects the results coming back (core NATS, driver's clock)."""

    def __init__(self, client: Client, settings: Settings, *, traced: bool = False) -> None:
        self.client = client
        self.settings = settings
        self.traced = traced
        """Publish as a traced publisher does (`stanchion publish`, `publish_traced`): a W3C traceparent per event."""
        self.results: dict[str, Received] = {}
        self.sent_at: dict[str, float] = {}
        self._waiting: tuple[str, int, asyncio.Future[None]] | None = None
        self._count: dict[str, int] = {}

    async def start(self) -> Lane:
        await self.client.subscribe(self.settings.output_subject, cb=self._on_result)
        return self

    async def _on_result(self, msg: Msg) -> None:
        now = time.perf_counter()
        envelope = json.loads(msg.data)
        event_id: str = envelope["event_id"]
        if event_id in self.results:
            return
        self.results[event_id] = Received(now, envelope)
        prefix = event_id.rsplit("-", 1)[0]
        self._count[prefix] = self._count.get(prefix, 0) + 1
        if self._waiting is not None:
            want_prefix, want, future = self._waiting
            if prefix == want_prefix and self._count[prefix] >= want and not future.done():
                future.set_result(None)

    async def ready(self, service: Service | None = None, timeout: float = 60.0) -> None:
        """Wait until the lane's durable consumer exists (fail early if a service process died)."""
        js = self.client.jetstream()
        async with asyncio.timeout(timeout):
            while True:
                if service is not None and not service.alive():
                    raise RuntimeError(f"a service process of {self.settings.durable} exited:\n{service.log_tail()}")
                try:
                    await js.consumer_info(self.settings.input_stream, self.settings.durable)
                    return
                except NotFoundError:
                    await asyncio.sleep(0.1)

    def _headers(self) -> dict[str, str] | None:
        if not self.traced:
            return None
        return {"traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"}

    @staticmethod
    def payloads(prefix: str, n: int) -> list[tuple[str, bytes]]:
        return [
            (f"{prefix}-{i}", json.dumps({"id": f"{prefix}-{i}", "text": f"the app crashes on login {i}"}).encode())
            for i in range(n)
        ]

    async def burst(self, n: int, timeout: float = 600.0) -> float:
        """Publish ``n`` fresh events at once; events/s from the first publish to the last result."""
        prefix = f"r{next(_rounds)}"
        events = self.payloads(prefix, n)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting = (prefix, n, future)
        started = time.perf_counter()
        for _, data in events:
            await self.client.publish(self.settings.input_subject, data, headers=self._headers())
        await self.client.flush()
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            got = self._count.get(prefix, 0)
            raise RuntimeError(f"{self.settings.durable}: {got} of {n} results within {timeout:.0f} s") from None
        finally:
            self._waiting = None
        last = max(self.results[event_id].at for event_id, _ in events)
        return n / (last - started)

    async def paced(self, n: int, rate: float, timeout: float = 120.0) -> list[tuple[float, dict[str, Any]]]:
        """Publish ``n`` fresh events at ``rate``/s; (publish → result seconds, envelope) for each."""
        prefix = f"r{next(_rounds)}"
        events = self.payloads(prefix, n)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting = (prefix, n, future)
        started = time.perf_counter()
        try:
            for i, (event_id, data) in enumerate(events):
                await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
                self.sent_at[event_id] = time.perf_counter()
                await self.client.publish(self.settings.input_subject, data)
                await self.client.flush()
            await asyncio.wait_for(future, timeout)
        finally:
            self._waiting = None
        return [
            (self.results[event_id].at - self.sent_at[event_id], self.results[event_id].envelope)
            for event_id, _ in events
        ]


async def interleave(
    variants: Sequence[tuple[str, Callable[[], Awaitable[float]]]], rounds: int
) -> dict[str, list[float]]:
    """Run every variant once per round, in an order that alternates between rounds."""
    values: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name, run in order:
            values[name].append(await run())
            print(f"    round {r + 1}/{rounds} {name}: {values[name][-1]:.1f}", flush=True)
    return values
