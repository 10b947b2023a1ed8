"""The ``stanchion`` command: run the service, publish events, run the demo, report, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import nats
import typer
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError, NotFoundError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.connection import connect_options
from stanchion.handlers.observability.logs import configure_logging
from stanchion.handlers.observability.telemetry import configure_telemetry, publish_traced
from stanchion.handlers.policy import Policy, load_policy, resolve_policy
from stanchion.handlers.settings import Settings, load_settings

cli = typer.Typer(
    name="stanchion",
    help="Reliable, typed LLM answers to NATS events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def main() -> None:
    cli()


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"stanchion: {message}", err=True)
    return typer.Exit(code)


def _configure() -> tuple[Settings, Policy]:
    try:
        settings = load_settings()
        return settings, resolve_policy(settings)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None


@contextlib.contextmanager
def nats_server(settings: Settings) -> Iterator[str]:
    """``NATS_URL`` if set; otherwise an embedded nats-server for the duration of the block."""
    if settings.nats_url:
        yield settings.nats_url
        return
    from stanchion.handlers.nats.embedded import EmbeddedNats

    try:
        server = EmbeddedNats(settings.nats_server_bin, settings.nats_store_dir)
        server.start()
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    try:
        yield server.url
    finally:
        server.stop()


async def _quiet(exc: Exception) -> None:
    """nats-py's default error callback prints a traceback; the CLI reports errors itself, in one line."""


async def _connect(url: str, settings: Settings, **options: Any) -> Client:
    try:
        return await nats.connect(url, error_cb=_quiet, **connect_options(settings), **options)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None


async def _check_nats(url: str, settings: Settings) -> None:
    """Fail fast, with a readable message, when the server is unreachable or refuses us."""
    try:
        options = connect_options(settings)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    try:
        # nats-py keeps retrying a refused first connection even with allow_reconnect=False: bound it.
        nc = await asyncio.wait_for(
            nats.connect(
                url, connect_timeout=5, max_reconnect_attempts=2, reconnect_time_wait=0.2, error_cb=remember, **options
            ),
            timeout=20,
        )
    except Exception as exc:
        cause = _most_telling(errors) or exc
        raise _fail(f"cannot connect to NATS at {_safe_url(url)}: {cause or type(cause).__name__}", 1) from None
    await nc.close()


def _most_telling(errors: list[Exception]) -> Exception | None:
    """The server's refusal (authorization, TLS) if one of the attempts got it, else the first error.

    After refusing, the server closes the connection, so later attempts may only see a reset."""
    telling = ("authoriz", "authentic", "permission", "certificate", "tls", "ssl")
    return next((e for e in errors if any(word in str(e).lower() for word in telling)), errors[0] if errors else None)


def _safe_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url.rpartition("@")[2]


@cli.command()
def run() -> None:
    """Run the service: consume tasks, answer them, publish results (logs on stderr; Ctrl-C stops it)."""
    settings, policy = _configure()
    from stanchion.handlers.nats.app import create_app, tune_gc
    from stanchion.handlers.runtime.service import ClassifierService

    try:
        telemetry = configure_telemetry(settings)
        service = ClassifierService(settings, policy)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    configure_logging(settings.log_level, settings.log_format, service.redact.secrets)

    async def serve(url: str) -> None:
        await _check_nats(url, settings)
        try:
            app = create_app(settings, service, url=url)
        except ConfigError as exc:
            raise _fail(f"configuration error: {exc}") from None

        async def tuned() -> None:  # on the loop's thread (FastStream runs sync hooks in a worker thread)
            tune_gc(settings.gc_threshold)

        app.after_startup(tuned)
        await app.run()

    try:
        with nats_server(settings) as url, contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(url))
    finally:
        if telemetry is not None:
            telemetry.shutdown()  # flush the last spans and metrics


@cli.command()
def publish(
    subject: Annotated[str, typer.Argument(help="Subject to publish to, e.g. tasks.classify.")],
    payload: Annotated[str | None, typer.Argument(help="One JSON event.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="A JSON-lines file: one event per line.")] = None,
) -> None:
    """Publish one event, or every line of a JSON-lines file, to NATS_URL."""
    if (payload is None) == (file is None):
        raise _fail("give either a JSON payload or --file, not both or neither")
    settings, _ = _configure()
    if not settings.nats_url:
        raise _fail("configuration error: NATS_URL is not set: publish needs a running server")
    lines = [payload.encode()] if payload is not None else _read_lines(file)
    try:
        telemetry = configure_telemetry(settings)  # each event's trace starts here when tracing is configured
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    try:
        asyncio.run(_publish(settings, settings.nats_url, subject, lines))
    finally:
        if telemetry is not None:
            telemetry.shutdown()


def _read_lines(file: Path | None) -> list[bytes]:
    assert file is not None
    try:
        return [line for line in file.read_bytes().splitlines() if line.strip()]
    except OSError as exc:
        raise _fail(f"cannot read {str(file)!r}: {exc.strerror}", 1) from None


async def _publish(settings: Settings, url: str, subject: str, lines: list[bytes]) -> None:
    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    js = nc.jetstream()
    stored = 0
    try:
        with Progress(console=err, transient=True, disable=len(lines) < 2) as progress:
            task = progress.add_task(f"publishing to {subject}", total=len(lines))
            for line in lines:
                try:
                    await publish_traced(js, subject, line)
                    stored += 1
                except NoStreamResponseError:
                    await nc.publish(subject, line)  # no stream on that subject: plain NATS
                progress.advance(task)
        await nc.flush()
    finally:
        await nc.close()
    out.print(f"published {len(lines)} message(s) to {subject} ({stored} stored by JetStream)")


SAMPLES: list[tuple[str, str]] = [
    ("simple", "The login page crashes with a 500 error after the last deploy"),
    ("simple", "Please add dark mode to the dashboard"),
    ("simple", "How do I reset my API token?"),
    (
        "complex",
        "URGENT: production outage, payments fail for every customer since 10:02, data loss possible",
    ),
    ("simple", "Typo on the pricing page: 'recieve'"),
    ("simple", "Would be nice to export reports as CSV"),
    (
        "complex",
        "After upgrading to 2.3 the sync job intermittently fails with a timeout exception and retries forever",
    ),
    ("simple", "Is it possible to use SSO with Okta?"),
    ("simple", "Thanks for the quick fix yesterday!"),
    ("simple", "Security: the reset link does not expire"),
]


@cli.command()
def demo(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the service's logs.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every answer.")] = 120.0,
) -> None:
    """Start NATS (embedded unless NATS_URL is set) and the service, classify sample events, print each result."""
    settings, policy = _configure()
    from stanchion.handlers.runtime.service import ClassifierService

    try:
        service = ClassifierService(settings, policy)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    configure_logging(settings.log_level if verbose else "error", settings.log_format, service.redact.secrets)
    models = ", ".join(f"{m.name} ({m.model})" for m in policy.models) or "none"
    out.print(f"models: {models}; then the keyword heuristic")
    with nats_server(settings) as url:
        ok = asyncio.run(_demo(settings, service, url, timeout))
    if not ok:
        raise typer.Exit(1)


async def _demo(settings: Settings, service: Any, url: str, wait_s: float) -> bool:
    from stanchion.handlers.nats.app import create_app
    from stanchion.handlers.observability.report import gather, render

    await _check_nats(url, settings)
    app = create_app(settings, service, url=url)
    run_id = uuid.uuid4().hex[:8]
    ids = [f"demo-{run_id}-{i:02d}" for i in range(len(SAMPLES))]
    answers: dict[str, dict[str, Any]] = {}
    done = asyncio.Event()
    nc = await _connect(url, settings)

    async def collect(msg: Any) -> None:
        body = json.loads(msg.data)
        if body.get("event_id") in ids:
            answers[body["event_id"]] = body
            if len(answers) == len(ids):
                done.set()

    try:
        await nc.subscribe(settings.output_subject, cb=collect)
        await nc.subscribe(settings.dlq_subject, cb=collect)
        async with app:
            js = nc.jetstream()
            started = time.monotonic()
            for event_id, (kind, text) in zip(ids, SAMPLES, strict=True):
                event = {"id": event_id, "text": text, "kind": kind, "source": "demo"}
                await js.publish(settings.input_subject, json.dumps(event).encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), wait_s)
            elapsed = time.monotonic() - started
            replicas = await gather(nc, durable=settings.durable, wait_s=0.5)
    finally:
        await nc.close()
    _print_results(ids, answers, elapsed)
    out.print()
    render(replicas, out, settings.budget_usd)
    return len(answers) == len(ids) and all("result" in a for a in answers.values())


def _print_results(ids: list[str], answers: dict[str, dict[str, Any]], elapsed: float) -> None:
    table = Table(title="stanchion demo")
    for column in ("id", "category", "priority", "served by", "degraded", "latency ms"):
        table.add_column(column, justify="right" if column in ("priority", "latency ms") else "left")
    latencies: list[float] = []
    for event_id in ids:
        answer = answers.get(event_id)
        if answer is None:
            table.add_row(event_id, "-", "-", "no answer", "-", "-")
        elif "result" in answer:
            latencies.append(float(answer["latency_ms"]))
            result = answer["result"]
            table.add_row(
                event_id,
                result["category"],
                str(result["priority"]),
                answer["model"],
                str(answer["degraded"]).lower(),
                f"{answer['latency_ms']:.0f}",
            )
        else:
            table.add_row(event_id, "-", "-", f"dead letter: {answer.get('error_type')}", "-", "-")
    out.print(table)
    answered = len(latencies)
    degraded = sum(1 for a in answers.values() if a.get("degraded"))
    p50 = statistics.median(latencies) if latencies else 0.0
    p95 = sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)] if latencies else 0.0
    out.print(
        f"{answered}/{len(ids)} answered ({degraded} degraded by the heuristic), "
        f"{len(answers) - answered} dead letters, {len(ids) - len(answers)} missing; "
        f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; {elapsed:.1f} s in all"
    )


@cli.command()
def report(
    wait: Annotated[float, typer.Option(help="Seconds to wait for the replicas' answers.")] = 1.0,
    every: Annotated[bool, typer.Option("--all", help="Every stanchion service, not one durable.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """The production report: each running replica's figures and the combined table (calls, success rate,
    p50/p95/p99 latency, cost per call and in total against STANCHION_BUDGET_USD, fallbacks, breakers)."""
    settings, _ = _configure()
    url = _require_nats(settings)
    asyncio.run(_report(settings, url, wait, None if every else settings.durable, as_json))


async def _report(settings: Settings, url: str, wait_s: float, durable: str | None, as_json: bool) -> None:
    from stanchion.handlers.observability.report import combine, gather, render

    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    try:
        replicas = await gather(nc, durable=durable, wait_s=wait_s)
    finally:
        await nc.close()
    if as_json:
        figures = {
            "replicas": [r.to_dict() for r in replicas],
            "combined": combine(replicas).to_dict(),
            "budget_usd": settings.budget_usd,
        }
        out.print_json(json.dumps(figures))
    else:
        render(replicas, out, settings.budget_usd)
    if not replicas:
        raise typer.Exit(1)


dlq = typer.Typer(help="Dead letters: list them, replay them.", no_args_is_help=True)
cli.add_typer(dlq, name="dlq")


def _require_nats(settings: Settings) -> str:
    if not settings.nats_url:
        raise _fail("configuration error: NATS_URL is not set: the dead-letter tools need a running server")
    return settings.nats_url


@dlq.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest last.")] = 100,
) -> None:
    """Table of the dead letters in the dead-letter stream: reason, subject, deliveries, age."""
    settings, _ = _configure()
    asyncio.run(_dlq_list(settings, _require_nats(settings), limit))


async def _dlq_list(settings: Settings, url: str, limit: int) -> None:
    from stanchion.handlers.nats.dlq import dead_letters

    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    try:
        letters = [letter async for letter in dead_letters(nc.jetstream(), settings.dlq_stream)]
    except NotFoundError:
        letters = []
    finally:
        await nc.close()
    shown = letters[-limit:]
    table = Table(title=f"dead letters in {settings.dlq_stream}: {len(letters)}")
    for column in ("seq", "event id", "error", "reason", "subject", "deliveries", "age"):
        table.add_column(column, overflow="fold")
    now = datetime.now(UTC)
    for letter in shown:
        dead = letter.dead
        table.add_row(
            str(letter.seq),
            dead.event_id or "-",
            dead.error_type,
            dead.reason,
            dead.subject,
            str(dead.deliveries),
            _age(now - dead.dead_at),
        )
    out.print(table)


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dlq.command("replay")
def dlq_replay(
    event_id: Annotated[str | None, typer.Option("--id", help="Replay the dead letters of this event id.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    policy_file: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Replay only what a service running this policy file could answer (skip poison, and events "
            "whose route offers no untried model and no heuristic).",
        ),
    ] = None,
) -> None:
    """Republish dead letters to their original subject (they keep their id) and remove them from the stream."""
    if (event_id is None) == (not replay_all):
        raise _fail("give either --id ID or --all")
    settings, _ = _configure()
    policy: Policy | None = None
    if policy_file is not None:
        try:
            policy = load_policy(policy_file)
        except ConfigError as exc:
            raise _fail(f"configuration error: {str(exc).replace('STANCHION_POLICY', '--policy')}") from None
    replayed = asyncio.run(_dlq_replay(settings, _require_nats(settings), event_id, policy))
    if event_id is not None and replayed == 0:
        raise _fail(f"no replayable dead letter with id {event_id!r}", 1)


async def _dlq_replay(settings: Settings, url: str, event_id: str | None, policy: Policy | None) -> int:
    from stanchion.handlers.nats.dlq import answerable_under, dead_letters, replay

    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    js = nc.jetstream()
    replayed = skipped = 0
    try:
        letters = [
            letter
            async for letter in dead_letters(js, settings.dlq_stream)
            if event_id is None or letter.dead.event_id == event_id
        ]
        for letter in letters:
            if policy is not None and (why := answerable_under(policy, letter.dead)) is not None:
                err.print(f"skipped {letter.seq} ({letter.dead.event_id}): {why}", markup=False)
                skipped += 1
                continue
            try:
                await replay(js, settings.dlq_stream, letter)
                replayed += 1
            except ValueError as exc:
                err.print(f"skipped: {exc}", markup=False)
                skipped += 1
    except NotFoundError:
        pass
    finally:
        await nc.close()
    out.print(f"replayed {replayed} dead letter(s)" + (f", skipped {skipped}" if skipped else ""))
    return replayed


if __name__ == "__main__":  # pragma: no cover
    main()
