"""The production report: every running replica's statistics, gathered over NATS, and their sum.

Each service process registers a NATS micro service named ``stanchion`` (the NATS services convention:
``$SRV.PING|INFO|STATS.stanchion``) with a ``stats`` endpoint whose data is its ``ServiceStats``.
``stanchion report`` sends one ``$SRV.STATS.stanchion`` request, collects every reply for a moment, keeps
the replicas of one deployment (same durable consumer), and prints per model and overall figures.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig
from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.measure import Measurement
from rich.table import Table

from stanchion.handlers.observability.stats import Histogram, ModelStats, ServiceStats
from stanchion.middleware import BreakerRecord

SERVICE_NAME = "stanchion"
VERSION = "0.1.0"


async def register(nc: Client, stats: ServiceStats) -> Service:
    """Announce one handler of this process as a ``stanchion`` micro service whose STATS carry ``stats``
    (its metadata: the handler's name, input subject and durable)."""
    durable = stats.durable

    def stats_data(_: EndpointStats) -> dict[str, Any]:
        return stats.to_dict()

    service = await add_service(
        nc,
        ServiceConfig(
            name=SERVICE_NAME,
            version=VERSION,
            description=f"Stanchion handler {stats.handler}: typed LLM answers behind a reliability stack.",
            metadata={
                "handler": stats.handler,
                "durable": durable,
                "input_subject": stats.subject,
                "host": stats.host,
                "pid": str(stats.pid),
            },
            stats_handler=stats_data,
        ),
    )
    stats.replica = service.id

    async def reply(request: Request) -> None:
        await request.respond(json.dumps(stats.to_dict()).encode())

    # Every replica answers its own queue group: a request on the subject gets one reply per replica.
    await service.add_endpoint(
        name="stats", subject=f"stanchion.stats.{durable}", queue_group=f"stats-{service.id}", handler=reply
    )
    return service


async def gather(
    nc: Client, *, durable: str | None = None, handler: str | None = None, wait_s: float = 1.0
) -> list[ServiceStats]:
    """Every replica's statistics (only those of ``durable`` / ``handler`` when given), oldest first."""
    replies: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            return

    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(f"$SRV.STATS.{SERVICE_NAME}", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait_s)
    finally:
        await subscription.unsubscribe()
    found: list[ServiceStats] = []
    for reply in replies:
        metadata = reply.get("metadata") or {}
        if durable is not None and metadata.get("durable") != durable:
            continue
        if handler is not None and metadata.get("handler") != handler:
            continue
        for endpoint in reply.get("endpoints") or []:
            if endpoint.get("name") == "stats" and isinstance(endpoint.get("data"), dict):
                found.append(ServiceStats.from_dict(endpoint["data"]))
    return sorted(found, key=lambda s: (s.handler, s.started_at, s.replica))


def by_handler(replicas: list[ServiceStats]) -> dict[tuple[str, str], list[ServiceStats]]:
    """Replicas grouped by handler (name and durable: two deployments of one handler stay apart)."""
    groups: dict[tuple[str, str], list[ServiceStats]] = {}
    for stats in replicas:
        groups.setdefault((stats.handler, stats.durable), []).append(stats)
    return groups


def combine(replicas: list[ServiceStats]) -> ServiceStats:
    total = ServiceStats(replica="all", replicas=0)
    if replicas:
        total.handler, total.subject, total.durable = replicas[0].handler, replicas[0].subject, replicas[0].durable
    for replica in replicas:
        total.merge(replica)
    return total


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _pct(part: int, whole: int) -> str:
    return "-" if whole == 0 else f"{100 * part / whole:.1f}%"


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    return "$" + f"{value:.6f}".rstrip("0").rstrip(".") if value < 1 else f"${value:,.2f}"


def _model_row(name: str, stats: ModelStats) -> list[str]:
    latency = stats.latency
    average = stats.cost_usd / stats.priced_calls if stats.priced_calls else None
    return [
        f"{name}\n[dim]{stats.model}[/dim]" if stats.model and stats.model != name else name,
        str(stats.calls),
        _pct(stats.ok, stats.calls),
        _percentiles(latency),
        _tokens(stats.input_tokens, stats.output_tokens),
        _usd(average),
        _usd(stats.cost_usd if stats.priced_calls else None),
    ]


def _model_line(name: str, stats: ModelStats) -> str:
    """A model's row as words, for a terminal too narrow for the table: wrapped between figures, never inside."""
    _, calls, ok, latency, tokens, average, total = _model_row(name, stats)
    model = f" ({stats.model})" if stats.model and stats.model != name else ""
    return (
        f"[bold]{name}[/bold]{model}: {calls} calls, ok {ok}, p50/p95/p99 {latency} ms, tokens in/out {tokens}, "
        f"{average} per call, {total} in all"
    )


def _count(n: int) -> str:
    """A token count in a few characters: exact below 100,000, then k / M (the JSON report has them exact)."""
    if n < 100_000:
        return str(n)
    return f"{n / 1000:.0f}k" if n < 10_000_000 else f"{n / 1_000_000:.1f}M"


def _tokens(input_tokens: int, output_tokens: int) -> str:
    return f"{_count(input_tokens)}/{_count(output_tokens)}"


def _percentiles(latency: Histogram) -> str:
    return "/".join(_ms(latency.percentile(q)) for q in (0.5, 0.95, 0.99))


def stats_table(
    stats: ServiceStats,
    title: str,
    budget_usd: float | None,
    console: Console | None = None,
    shared: bool = False,
) -> Group:
    """One replica's (or the sum's) figures: a row per model, then the event-level summary.

    ``shared``: the breakers are shared by the replicas and shown once, beside the handler: not per replica.

    Names are never cut: when the table would not fit whole in the ``console``'s width, each model gets a line of words
    instead (wrapped between figures).
    """
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("candidate / model", "left"),
        ("calls", "right"),
        ("ok", "right"),
        ("p50/p95/p99 ms", "right"),
        ("tokens in/out", "right"),
        ("$/call", "right"),
        ("$ total", "right"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)
    models = sorted(stats.models.items())
    for name, model in models:
        table.add_row(*_model_row(name, model))
    every = _every_model(stats)
    table.add_row(*_model_row("all models", every), style="bold")
    calls, priced = every.calls, every.priced_calls
    finished = stats.answered + sum(stats.dead_letters.values())
    dead = ", ".join(f"{kind} {n}" for kind, n in sorted(stats.dead_letters.items())) or "0"
    breakers = ", ".join(f"{name} {state}" for name, state in sorted(stats.breakers.items())) or "all closed"
    if shared:
        breakers = "shared (above)"
    cost = stats.cost_usd
    failed = f", of which {_usd(stats.failed_cost_usd)} on failed calls" if stats.failed_cost_usd else ""
    spent = _usd(cost) if priced or not calls else "unknown (no price known for these models)"
    budget = (
        f"{spent} of {_usd(budget_usd)} budget ({100 * cost / budget_usd:.1f}%)"
        if budget_usd
        else f"{spent} (no budget set: STANCHION_BUDGET_USD)"
    )
    latency = stats.latency
    errors = "; ".join(
        f"{name} {', '.join(f'{kind} {n}' for kind, n in sorted(model.errors.items()))}"
        for name, model in sorted(stats.models.items())
        if model.errors
    )
    lines = [
        f"events: {stats.events} handled, {stats.answered} answered "
        f"(success {_pct(stats.answered, finished)}), {stats.degraded} degraded "
        f"({_pct(stats.degraded, stats.answered)}), dead letters {dead}, {stats.redelivered} redelivered, "
        f"{stats.from_store} answered from the result store",
        f"model call errors: {errors or 'none'}",
        f"event latency: p50 {_ms(latency.percentile(0.5))} ms, p95 {_ms(latency.percentile(0.95))} ms, "
        f"p99 {_ms(latency.percentile(0.99))} ms",
        f"retries {stats.retries}; fallbacks {stats.fallbacks}, in {stats.fell_back} events "
        f"(fallback rate {_pct(stats.fell_back, stats.events)}); breakers: {breakers}",
        f"cost: {budget}{failed}",
    ]
    if console is not None and Measurement.get(console, console.options.update_width(10_000), table).maximum > (
        console.width
    ):
        per_model = [_model_line(name, model) for name, model in [*models, ("all models", every)]]
        return Group(f"[bold]{title}[/bold]", *per_model, *lines)
    return Group(table, *lines)


def _every_model(stats: ServiceStats) -> ModelStats:
    """Every model's calls as one (the "all models" row); its cost is the service's total."""
    every = ModelStats(cost_usd=stats.cost_usd)
    for model in stats.models.values():
        every.calls += model.calls
        every.ok += model.ok
        every.priced_calls += model.priced_calls
        every.input_tokens += model.input_tokens
        every.output_tokens += model.output_tokens
        every.latency.merge(model.latency)
    return every


def shared_breakers(records: Mapping[str, BreakerRecord], handler: str) -> dict[str, dict[str, Any]]:
    """The shared breakers one handler uses: provider health (by model, every handler's) and its own output quality
    (``<handler>/<model>``), each with its state and, when open, since when (wall clock)."""
    mine = {
        key: {"state": record.state.value, "opened_at": record.opened_at}
        for key, record in records.items()
        if "/" not in key or key.startswith(f"{handler}/")
    }
    return dict(sorted(mine.items()))


def _breaker_words(breakers: Mapping[str, Mapping[str, Any]], now: float) -> str:
    words = []
    for key, record in breakers.items():
        since = record.get("opened_at")
        ago = f" for {now - since:,.0f} s" if since is not None and record["state"] != "closed" else ""
        words.append(f"{key} {record['state']}{ago}")
    return ", ".join(words) or "all closed"


def render(
    replicas: list[ServiceStats],
    console: Console,
    budget_usd: float | None,
    shared: Mapping[str, BreakerRecord] | None = None,
) -> None:
    """Per handler (name and subject): each replica's figures, then the combined table of its replicas.

    ``shared``: the records of the breakers the replicas share (``read_breakers``): shown once per handler, and no
    longer per replica.
    """
    if not replicas:
        console.print(
            f"no running stanchion service answered $SRV.STATS.{SERVICE_NAME} within the wait "
            "(every handler of every app answers it, whatever its names; --wait to wait longer)"
        )
        return
    now = time.time()
    for (handler, _), group in by_handler(replicas).items():
        label = f"handler {handler or '?'} ({group[0].subject or '?'})"
        console.print(f"[bold]{label}[/bold]: {len(group)} replica(s)")
        if shared:
            console.print(f"breakers, shared by the replicas: {_breaker_words(shared_breakers(shared, handler), now)}")
        for stats in group:
            title = f"replica {stats.replica} ({stats.host} pid {stats.pid}, up {now - stats.started_at:,.0f} s)"
            console.print(stats_table(stats, title, budget_usd, console, bool(shared)))
            console.print()
        if len(group) > 1:
            title = f"{label} combined: {len(group)} replicas"
            console.print(stats_table(combine(group), title, budget_usd, console, bool(shared)))
            console.print()
