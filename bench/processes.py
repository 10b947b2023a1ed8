"""Comparisons against `stanchion run` subprocesses: tracing, concurrency and replicas, fail-fast, memory.

The benchmark process only publishes bursts of events and counts the result envelopes on the output
subject; the services talk to the fake OpenAI-compatible provider (``bench.provider``, its own process)
over real HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from bench.harness import (
    PIDS,
    PY_SPY,
    Lane,
    Report,
    Service,
    children,
    collector,
    cpu_s,
    interleave,
    lane_settings,
    machine_busy_s,
    median,
    model_policy,
    percentile,
    policy_file,
    provider,
    rss_kib,
    services,
    spread,
    summarise_profile,
)
from stanchion.handlers.nats.embedded import free_port

BREAKER_OPEN = "[breaker]\nconsecutive_failures = 5\nopen_s = 600\n"
"""Trips after 5 failures and stays open for the whole measurement (no half-open probe mid-run)."""
BREAKER_NEVER = "[breaker]\nconsecutive_failures = 1000000000\nfailure_rate = 1.0\nwindow = 5000\nmin_calls = 5000\n"
"""A breaker that does not trip within the run: the "without a breaker" variant."""


async def _lanes(client: Client, running: list[Service], traced: tuple[bool, ...] = ()) -> list[Lane]:
    flags = traced or (False,) * len(running)
    lanes = [await Lane(client, s.settings, traced=t).start() for s, t in zip(running, flags, strict=True)]
    for lane, service in zip(lanes, running, strict=True):
        await lane.ready(service)
    return lanes


# -- 2: tracing -----------------------------------------------------------------------------------


async def tracing(url: str, directory: Path, *, quick: bool) -> Report:
    report = Report(
        "2. Tracing: everything traced and exported vs off",
        "Two `stanchion run` processes on the suite's nats-server, the same policy (one model on the fake "
        "provider with no latency, then the heuristic), 16 in flight. **on** has `OTEL_EXPORTER_OTLP_ENDPOINT` "
        "set to a real OTLP/HTTP receiver (`tests/otlp_receiver.py`) in a process of its own, like a collector "
        "(`bench/collector.py`): FastStream messaging spans, the attempt spans, pydantic-ai gen_ai spans (and OTel "
        "metrics where the service exports them) — all exported; its events arrive with a W3C `traceparent`, as "
        "from a traced publisher (`stanchion publish`, `publish_traced`), so the service continues their traces. "
        "**off** has no endpoint and plain events. Bursts of fresh events alternate between the two; rate = events "
        "/ (first publish → last result).",
    )
    n, rounds = (300, 3) if quick else (800, 5)
    with provider(0.0) as base_url, collector() as received:
        policy = policy_file(directory, model_policy(base_url))
        off_settings = lane_settings(url, max_in_flight=16)
        on_settings = lane_settings(url, max_in_flight=16)
        with (
            services(off_settings, directory, STANCHION_POLICY=str(policy)) as off,
            services(
                on_settings, directory, STANCHION_POLICY=str(policy), OTEL_EXPORTER_OTLP_ENDPOINT=received.endpoint
            ) as on,
        ):
            client = await nats.connect(url)
            try:
                off_lane, on_lane = await _lanes(client, [off, on], traced=(False, True))
                await off_lane.burst(100)
                await on_lane.burst(100)
                values = await interleave(
                    [("off", lambda: off_lane.burst(n)), ("on", lambda: on_lane.burst(n))], rounds
                )
                await asyncio.sleep(6)  # let the batch span processor export the last spans
            finally:
                await client.close()
    ratio = median(values["on"]) / median(values["off"])
    events_on = 100 + n * rounds
    extra_ms = (1 / median(values["on"]) - 1 / median(values["off"])) * 1000
    if ratio < 0.75:
        report.notes.append(
            f"Missed: tracing costs {extra_ms:.1f} ms of wall time per event at 16 in flight, for about "
            f"{received.spans / events_on:.1f} spans per event (each created, ended, batched, serialised to "
            "protobuf and posted). The reference rows show the same shape without the service: FastStream's own "
            "messaging spans alone cut a bare consumer's rate by more than half. Not tried here: sampling (a "
            "ParentBased ratio sampler would cut the cost in proportion), or dropping the per-request gen_ai spans."
        )
    report.add("tracing off (events/s)", f"{median(values['off']):.0f}", detail=spread(values["off"]))
    report.add("traced + exported (events/s)", f"{median(values['on']):.0f}", detail=spread(values["on"]))
    report.add("ratio on / off", f"{ratio:.3f}", "≥ 0.75", ratio >= 0.75)
    names = sorted({name.split(" ")[-1] for name in received.names})
    metrics = received.metrics
    report.notes.append(
        f"The receiver got {received.spans} spans ({', '.join(names[:8])}) and "
        f"{sum(metrics.values())} metric points ({', '.join(sorted(metrics)[:6]) or 'no metrics exported yet'})."
    )
    return report


# -- 3: concurrency and replicas ------------------------------------------------------------------


async def concurrency(url: str, directory: Path, *, quick: bool, profile: bool = True) -> Report:
    report = Report(
        "3. Concurrency: slow provider, CPU ceiling, replicas",
        "`stanchion run` processes with `STANCHION_MAX_IN_FLIGHT=64`, one model on the fake provider over HTTP "
        "(then the heuristic). **slow**: provider latency 200 ms. **ceiling**: a second provider process with "
        "no latency, one service. **2 replicas**: two services sharing the durable (`STANCHION_REPLICAS=2`) on "
        "the no-latency provider. Bursts of fresh events, interleaved; rate = events / (first publish → last "
        "result). Target for slow: ≥ 0.85 x min(64 / 0.2 s, ceiling).",
    )
    n, rounds = (600, 2) if quick else (1500, 3)
    with provider(0.2) as slow_url, provider(0.0) as fast_url:
        slow_policy = policy_file(directory, model_policy(slow_url))
        fast_policy = policy_file(directory, model_policy(fast_url))
        slow_s = lane_settings(url, max_in_flight=64)
        fast_s = lane_settings(url, max_in_flight=64)
        pair_s = lane_settings(url, max_in_flight=64, replicas=2)
        with (
            services(slow_s, directory, STANCHION_POLICY=str(slow_policy)) as slow,
            services(fast_s, directory, STANCHION_POLICY=str(fast_policy)) as fast,
            services(pair_s, directory, replicas=2, STANCHION_POLICY=str(fast_policy)) as pair,
        ):
            client = await nats.connect(url)
            try:
                slow_lane, fast_lane, pair_lane = await _lanes(client, [slow, fast, pair])
                for lane in (slow_lane, fast_lane, pair_lane):
                    await lane.burst(200)
                cpu: dict[str, list[float]] = {"slow": [], "ceiling": [], "2 replicas": []}
                others: dict[str, list[float]] = {}

                def measured(name: str, lane: Lane, service: Service, via: str) -> Callable[[], Awaitable[float]]:
                    helpers = {"provider": PIDS[via], "nats-server": PIDS.get("nats-server", 0)}

                    def sample() -> dict[str, float]:
                        got = {k: cpu_s(pid) for k, pid in helpers.items() if pid}
                        return {
                            **got,
                            "service": sum(cpu_s(pid) for pid in service.pids),
                            "driver": time.process_time(),
                            "whole machine": machine_busy_s(),
                        }

                    async def run() -> float:
                        before = sample()
                        rate = await lane.burst(n)
                        after = sample()
                        cpu[name].append((after["service"] - before["service"]) / n * 1000)
                        if name == "ceiling":
                            for key in after:
                                others.setdefault(key, []).append((after[key] - before[key]) / n * 1000)
                        return rate

                    return run

                values = await interleave(
                    [
                        ("slow", measured("slow", slow_lane, slow, slow_url)),
                        ("ceiling", measured("ceiling", fast_lane, fast, fast_url)),
                        ("2 replicas", measured("2 replicas", pair_lane, pair, fast_url)),
                    ],
                    rounds,
                )
            finally:
                await client.close()
        if profile and not PY_SPY.exists():
            report.notes.append(
                f"No profiles of the service: py-spy is not installed ({PY_SPY}; `pip install -e '.[bench]'`)."
            )
        elif profile:
            # Where the service's CPU goes on the HTTP path: one more service per provider, under py-spy, one burst.
            for label, policy in (("the instant provider", fast_policy), ("the 200 ms provider", slow_policy)):
                spy_s = lane_settings(url, max_in_flight=64)
                out = directory / f"profile-{spy_s.durable}.txt"
                with services(spy_s, directory, profile=out, STANCHION_POLICY=str(policy)) as spied:
                    client = await nats.connect(url)
                    try:
                        (spy_lane,) = await _lanes(client, [spied])
                        await spy_lane.burst(200)
                        await spy_lane.burst(n)
                    finally:
                        await client.close()
                    for pid in children(spied.pids[0]):
                        os.kill(pid, signal.SIGTERM)
                    spied.processes[0].wait(60)  # py-spy writes the profile once the service has exited
                if out.exists():
                    report.notes.append(
                        f"Profile of one service on {label} (py-spy --gil, 250 Hz, a burst of {n} after 200 of "
                        "warm-up; start-up imports left out):\n" + summarise_profile(out)
                    )
    slow_rate, ceiling, pair_rate = (median(values[k]) for k in ("slow", "ceiling", "2 replicas"))
    bound = min(64 / 0.2, ceiling)
    report.add(
        "CPU ceiling, instant provider (events/s)",
        f"{ceiling:.0f}",
        detail=f"{spread(values['ceiling'])}; service CPU {median(cpu['ceiling']):.2f} ms/event",
    )
    report.add(
        "slow provider 200 ms, 64 in flight (events/s)",
        f"{slow_rate:.0f}",
        f"≥ 0.85 x {bound:.0f} = {0.85 * bound:.0f}",
        slow_rate >= 0.85 * bound,
        f"{spread(values['slow'])}; {slow_rate / bound:.2f} of the bound; "
        f"service CPU {median(cpu['slow']):.2f} ms/event",
    )
    report.add(
        "2 replicas, instant provider (events/s)",
        f"{pair_rate:.0f}",
        detail=f"{spread(values['2 replicas'])}; service CPU {median(cpu['2 replicas']):.2f} ms/event",
    )
    if slow_rate < 0.85 * bound:
        slow_cpu, fast_cpu = median(cpu["slow"]), median(cpu["ceiling"])
        report.notes.append(
            f"Missed (slow): the service is CPU-bound here too, not concurrency-bound ({slow_rate:.0f}/s x 0.2 s = "
            f"{slow_rate * 0.2:.0f} events in flight of 64), and with the provider's latency it spends "
            f"{slow_cpu:.2f} ms of CPU per event against {fast_cpu:.2f} ms with the instant provider, so its own "
            f"ceiling is about {1000 / slow_cpu:.0f}/s. Compare the two profiles for what costs more while "
            "requests wait (more concurrent tasks, connections and heartbeats)."
        )
    machine_ms = median(others.pop("whole machine", [0.0]))
    budget = {k: median(v) for k, v in others.items()}
    ours_ms = sum(budget.values())
    cores = os.cpu_count() or 1
    report.notes.append(
        "CPU per event during the ceiling rounds (ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in budget.items())
        + f"; total {ours_ms:.2f} ms, so {cores} cores allow at most {cores * 1000 / ours_ms:.0f} events/s for all "
        f"of them together. The whole machine was busy {machine_ms:.2f} ms per event: "
        f"{max(machine_ms - ours_ms, 0.0):.2f} ms went to other work on the shared machine."
    )
    if pair_rate / ceiling < 1.7:
        needed = 1.7 * ceiling * ours_ms / 1000
        service_ms = budget.get("service", 0.0)
        bound = cores * service_ms / ours_ms if ours_ms else float("nan")
        report.notes.append(
            f"Missed: 1.7 x {ceiling:.0f} events/s needs {needed:.2f} cores at the CPU per event measured for the "
            f"service, the provider, nats-server and the driver, of the {cores} the machine has. One replica has a "
            f"core to itself; two share the machine with the others, so even with every core busy two replicas "
            f"reach at most {cores} x {service_ms:.2f} / {ours_ms:.2f} = {bound:.2f}x of one. A cheaper service "
            "lowers that bound (the others' share grows); only the provider, nats-server and driver costing less "
            "per event, or more cores, raise it."
        )
    report.add("2 replicas / 1", f"{pair_rate / ceiling:.3f}x", "≥ 1.7x", pair_rate / ceiling >= 1.7)
    return report


# -- 4: fail-fast ---------------------------------------------------------------------------------


def _latencies(samples: list[tuple[float, dict[str, Any]]]) -> tuple[list[float], list[float], int]:
    e2e = [s * 1000 for s, _ in samples]
    inside = [float(env["latency_ms"]) for _, env in samples]
    degraded = sum(1 for _, env in samples if env.get("degraded"))
    return e2e, inside, degraded


async def fail_fast(url: str, directory: Path, *, quick: bool) -> Report:
    report = Report(
        "4. Fail-fast: provider down, circuit open",
        "The one model points at a closed loopback port (connection refused); the route ends with the heuristic. "
        "**breaker**: the default policy's breaker (5 consecutive failures) with `open_s = 600`, opened by a "
        "warm-up, so every measured event finds it open. **no breaker**: thresholds it never reaches in the run, "
        "so every event goes through the retries (3 attempts, default backoff) before the fallback. Events are "
        "published one at a time at a steady rate below capacity (64 in flight). Latency = publish → result "
        "received by the benchmark (end to end, through NATS); the envelope's `latency_ms` (inside the service) "
        "is beside it.",
    )
    port = free_port()
    down = f"http://127.0.0.1:{port}/v1"
    fast_n, slow_n, rounds = (150, 30, 1) if quick else (400, 60, 2)
    open_s = lane_settings(url, max_in_flight=64)
    never_s = lane_settings(url, max_in_flight=64)
    with (
        services(
            open_s, directory, STANCHION_POLICY=str(policy_file(directory, model_policy(down, breaker=BREAKER_OPEN)))
        ) as with_breaker,
        services(
            never_s, directory, STANCHION_POLICY=str(policy_file(directory, model_policy(down, breaker=BREAKER_NEVER)))
        ) as without,
    ):
        client = await nats.connect(url)
        try:
            open_lane, never_lane = await _lanes(client, [with_breaker, without])
            await open_lane.paced(20, 10.0)  # trips the breaker
            samples: dict[str, list[tuple[float, dict[str, Any]]]] = {"breaker": [], "no breaker": []}

            def paced(name: str, lane: Lane, n: int, rate: float) -> Callable[[], Awaitable[float]]:
                async def run() -> float:
                    got = await lane.paced(n, rate)
                    samples[name] += got
                    return percentile([s * 1000 for s, _ in got], 0.99)

                return run

            await interleave(
                [
                    ("breaker", paced("breaker", open_lane, fast_n, 50.0)),
                    ("no breaker", paced("no breaker", never_lane, slow_n, 10.0)),
                ],
                rounds,
            )
        finally:
            await client.close()
    e2e, inside, degraded = _latencies(samples["breaker"])
    e2e_nb, inside_nb, degraded_nb = _latencies(samples["no breaker"])
    p99 = percentile(e2e, 0.99)
    report.add(
        "circuit open: fallback answer p99, end to end (ms)",
        f"{p99:.1f}",
        "≤ 20 ms",
        p99 <= 20.0,
        f"p50 {percentile(e2e, 0.5):.1f} ms; {len(e2e)} events, {degraded} degraded",
    )
    report.add(
        "circuit open: inside the service, p50 / p99 (ms)",
        f"{percentile(inside, 0.5):.2f} / {percentile(inside, 0.99):.2f}",
    )
    report.add(
        "no breaker: fallback answer p50 / p99, end to end (ms)",
        f"{percentile(e2e_nb, 0.5):.0f} / {percentile(e2e_nb, 0.99):.0f}",
        detail=f"{len(e2e_nb)} events, {degraded_nb} degraded; "
        f"inside the service p50 {percentile(inside_nb, 0.5):.0f} ms",
    )
    return report


# -- 5: memory ------------------------------------------------------------------------------------


async def memory(url: str, directory: Path, *, quick: bool) -> Report:
    total = 20_000 if quick else 100_000
    report = Report(
        "5. Memory: RSS growth over many events",
        f"One `stanchion run` process, 64 in flight, {total:,} events with unique ids after a 5,000-event warm-up. "
        "To finish in minutes the model's provider is down and its circuit open (`open_s = 600`), so every event "
        "goes Route → Fallback → Retry → CircuitBreaker (rejects) → heuristic, and through the result store, "
        "the envelope and the publish. RSS is the service process's VmRSS.",
    )
    down = f"http://127.0.0.1:{free_port()}/v1"
    settings = lane_settings(url, max_in_flight=64)
    policy = policy_file(directory, model_policy(down, breaker=BREAKER_OPEN))
    with services(settings, directory, STANCHION_POLICY=str(policy)) as service:
        client = await nats.connect(url)
        try:
            (lane,) = await _lanes(client, [service])
            pid = service.pids[0]
            for _ in range(5):
                await lane.burst(1000)
            await asyncio.sleep(1)
            before = rss_kib(pid)
            trail = [before]
            rates = []
            step = 10_000
            for _ in range(total // step):
                rates.append(await lane.burst(step))
                lane.results.clear()  # the benchmark's own bookkeeping must not grow with the run
                trail.append(rss_kib(pid))
            await asyncio.sleep(1)
            after = rss_kib(pid)
        finally:
            await client.close()
    growth_mb = (after - before) / 1024
    report.add("RSS after warm-up (MiB)", f"{before / 1024:.1f}")
    report.add(f"RSS after {total:,} more events (MiB)", f"{after / 1024:.1f}", detail=f"{median(rates):.0f} events/s")
    report.add(
        "RSS growth (MiB)",
        f"{growth_mb:+.1f}",
        "≤ 10 MB",
        growth_mb <= 10.0 * 1_000_000 / 2**20,
        "every 10k: " + ", ".join(f"{k / 1024:.1f}" for k in trail),
    )
    return report
