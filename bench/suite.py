"""The benchmark suite of issue 6: ``python -m bench.suite [--only NAMES] [--quick] [--no-write]``.

Starts its own nats-server (JetStream, temporary store) and its own OpenAI-compatible provider processes,
runs each comparison in this one process run (variants interleaved, repeated, medians and ratios), prints
a table per comparison and writes ``bench/RESULTS.md``: all of it after a run of every comparison, only the
sections of the comparisons run with ``--only`` (the others stay, each naming the run it came from).
Comparisons: reference, overhead, tracing, concurrency, failfast, memory, agent, breakers. A full run takes about 10
minutes on 2 cores; ``--quick`` a few.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import breakers, inproc, processes
from bench.harness import PIDS, Report, print_report, render, workdir
from stanchion.handlers.nats.embedded import EmbeddedNats

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NAMES = ("reference", "overhead", "tracing", "concurrency", "failfast", "memory", "agent", "breakers")

Comparison = Callable[[str, Path, bool], Coroutine[Any, Any, Report]]


def _comparisons() -> dict[str, Comparison]:
    async def agent(url: str, directory: Path, quick: bool) -> Report:
        return await inproc.agent_path(quick=quick)

    return {
        "reference": lambda url, d, q: inproc.reference_points(url, quick=q),
        "overhead": lambda url, d, q: inproc.overhead(url, d, quick=q),
        "tracing": lambda url, d, q: processes.tracing(url, d, quick=q),
        "concurrency": lambda url, d, q: processes.concurrency(url, d, quick=q),
        "failfast": lambda url, d, q: processes.fail_fast(url, d, quick=q),
        "memory": lambda url, d, q: processes.memory(url, d, quick=q),
        "agent": agent,
        "breakers": lambda url, d, q: breakers.shared_breakers(url, quick=q),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    parser.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of: {', '.join(NAMES)}")
    parser.add_argument("--quick", action="store_true", help="fewer events and rounds (a few minutes)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := [name for name in chosen if name not in NAMES]:
        parser.error(f"unknown comparison(s): {', '.join(unknown)}")
    comparisons = _comparisons()
    started_at = datetime.datetime.now(datetime.UTC)
    load = os.getloadavg()
    started = time.perf_counter()
    reports: list[Report] = []
    failed = False
    with workdir() as directory, EmbeddedNats(store_dir=directory / "nats") as server:
        print(f"nats-server {server.url}; work directory {directory}", flush=True)
        if server.process is not None:
            PIDS["nats-server"] = server.process.pid
        for name in chosen:
            print(f"\n-- {name}", flush=True)
            t0 = time.perf_counter()
            try:
                report = asyncio.run(comparisons[name](server.url, directory, args.quick))
                if name == "agent":
                    inproc.agent_profiles(report, quick=args.quick)
                if name == "overhead":
                    inproc.overhead_profiles(report, quick=args.quick)
            except Exception:
                failed = True
                traceback.print_exc()
                report = Report(name, "The comparison failed; see the suite's output.")
                report.add("failed", traceback.format_exc(limit=1).strip().splitlines()[-1])
            report.seconds = time.perf_counter() - t0
            print_report(report)
            reports.append(report)
    wall = time.perf_counter() - started
    if not args.no_write:
        # A subset rewrites only its own sections: the others stay as their runs wrote them (each names its run).
        previous = RESULTS.read_text() if set(chosen) != set(NAMES) and RESULTS.exists() else None
        RESULTS.write_text(
            render(
                reports,
                argv=sys.argv[1:] if argv is None else argv,
                started=started_at,
                wall_s=wall,
                load=load,
                previous=previous,
            )
        )
        print(f"\nwrote {RESULTS}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
