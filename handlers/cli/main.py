"""The ``stanchion`` command: run the service, publish events, run the demo, report, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import nats
import typer
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from stanchion.contracts import DeadLetter
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.nats.connection import connect_options, nats_servers, redact_url
from stanchion.handlers.observability.logs import configure_logging
from stanchion.handlers.observability.telemetry import configure_telemetry, publish_traced
from stanchion.handlers.settings import NATS_CONNECTION, Settings, load_settings

if TYPE_CHECKING:
    from faststream import FastStream

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


def _configure(only: Collection[str] | None = None) -> Settings:
    """The settings (``only``: the fields this command reads; others' bad values are left at their defaults)."""
    try:
        return load_settings(only)
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
        return await nats.connect(nats_servers(url), error_cb=_quiet, **connect_options(settings), **options)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None


async def _check_nats(url: str, settings: Settings, *, jetstream: bool = False) -> None:
    """Fail fast, with a readable message, when the server is unreachable or refuses us (``jetstream``: or has no
    JetStream for us, or denies its API)."""
    try:
        options = connect_options(settings)
        servers = nats_servers(url)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    try:
        # nats-py keeps retrying a refused first connection even with allow_reconnect=False: bound it.
        nc = await asyncio.wait_for(
            nats.connect(
                servers,
                connect_timeout=5,
                max_reconnect_attempts=2,
                reconnect_time_wait=0.2,
                error_cb=remember,
                **options,
            ),
            timeout=20,
        )
    except Exception as exc:
        cause = _most_telling(errors) or exc
        raise _fail(f"cannot connect to NATS at {redact_url(url)}: {cause or type(cause).__name__}", 1) from None
    try:
        if jetstream:
            await _check_jetstream(nc)
    finally:
        await nc.close()


async def _check_jetstream(nc: Client) -> None:
    """On the CLI's own connection, whose errors are quiet: a denied API is one line, not the broker's warning too."""
    from stanchion.handlers.nats.preflight import jetstream_error

    try:
        await nc.jetstream().account_info()
    except NatsError as exc:
        raise _fail(f"configuration error: {jetstream_error(exc, nc, 'the account information')}") from None


def _most_telling(errors: list[Exception]) -> Exception | None:
    """The server's refusal (authorization, TLS) if one of the attempts got it, else the first error.

    After refusing, the server closes the connection, so later attempts may only see a reset."""
    telling = ("authoriz", "authentic", "permission", "certificate", "tls", "ssl")
    return next((e for e in errors if any(word in str(e).lower() for word in telling)), errors[0] if errors else None)


@cli.command()
def run(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODULE:APP]",
            help="Your FastStream app, imported from the current directory as `faststream run` does "
            "(default: the built-in classifier).",
        ),
    ] = None,
) -> None:
    """Run a service: consume, answer, publish results (logs on stderr; Ctrl-C or SIGTERM stops it gracefully).

    With no NATS_URL an embedded nats-server is started first, and NATS_URL set for the app. A start-up failure
    (a stream that another stream's subjects overlap, a server without JetStream, a denied JetStream API...) is
    one line on stderr and exit code 2."""
    from stanchion.handlers.process import Process, import_app

    settings = _configure()
    if settings.nats_url:
        asyncio.run(_check_nats(settings.nats_url, settings, jetstream=True))
    try:
        process = Process.start(settings)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    try:
        if target is None:
            from stanchion.handlers.classify.app import create_app

            app, _ = create_app(process.settings)
        else:
            app = import_app(target)
        process.serve(app)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(app))
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    except NatsError as exc:  # what FastStream's start-up raised beyond the checks (e.g. a stream not created)
        raise _fail(f"NATS error: {str(exc).removeprefix('nats: ')}") from None
    finally:
        process.stop()


async def _serve(app: FastStream) -> None:
    """Run the app; a stanchion app's start-up checks first, so that a failure is the only line printed.

    The app's own ``on_startup`` hook then finds them done; the broker's connection made here is the one
    FastStream starts on.
    """
    from stanchion.handlers.api import Stanchion

    reliable = app.context.get("stanchion")
    if isinstance(reliable, Stanchion):
        await reliable.preflight()
    await app.run()


@cli.command()
def publish(
    subject: Annotated[str, typer.Argument(help="Subject to publish to, e.g. tasks.classify.")],
    payload: Annotated[str | None, typer.Argument(help="One JSON event.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="A JSON-lines file: one event per line.")] = None,
    core: Annotated[
        bool, typer.Option("--core", help="Plain NATS: publish without JetStream (no stream needs to store them).")
    ] = False,
) -> None:
    """Publish one event, or every line of a JSON-lines file, to NATS_URL, into the JetStream stream that stores the
    subject (exit 1 when none does, unless --core)."""
    if (payload is None) == (file is None):
        raise _fail("give either a JSON payload or --file, not both or neither")
    settings = _configure()
    if not settings.nats_url:
        raise _fail("configuration error: NATS_URL is not set: publish needs a running server")
    lines = [payload.encode()] if payload is not None else _read_lines(file)
    try:
        telemetry = configure_telemetry(settings)  # each event's trace starts here when tracing is configured
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    try:
        asyncio.run(_publish(settings, settings.nats_url, subject, lines, core=core))
    finally:
        if telemetry is not None:
            telemetry.shutdown()


def _read_lines(file: Path | None) -> list[bytes]:
    assert file is not None
    try:
        return [line for line in file.read_bytes().splitlines() if line.strip()]
    except OSError as exc:
        raise _fail(f"cannot read {str(file)!r}: {exc.strerror}", 1) from None


async def _publish(settings: Settings, url: str, subject: str, lines: list[bytes], *, core: bool = False) -> None:
    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    js = nc.jetstream()
    stored = 0
    try:
        with Progress(console=err, transient=True, disable=len(lines) < 2) as progress:
            task = progress.add_task(f"publishing to {subject}", total=len(lines))
            for line in lines:
                if core:
                    await nc.publish(subject, line)
                else:
                    await _store(nc, js, subject, line, stored, len(lines))
                    stored += 1
                progress.advance(task)
        await nc.flush()
    finally:
        await nc.close()
    how = "core NATS, not stored" if core else f"{stored} stored by JetStream"
    out.print(f"published {len(lines)} message(s) to {subject} ({how})")


async def _store(nc: Client, js: JetStreamContext, subject: str, line: bytes, stored: int, total: int) -> None:
    """Publish one event into the stream of ``subject``; exit 1 with one line when no stream stored it."""
    from stanchion.handlers.nats.preflight import jetstream_error

    stored_so_far = f"only {stored} of {total} stored" if stored else "nothing stored"
    try:
        await publish_traced(js, subject, line)
        return
    except NoStreamResponseError:
        pass
    except NatsError as exc:
        raise _fail(f"{jetstream_error(exc, nc, f'to store on {subject}')}: {stored_so_far}", 1) from None
    try:
        await js.account_info()
    except NatsError as exc:  # no JetStream on the server (or for the account), or the API denied
        why = jetstream_error(exc, nc, "the account information")
        raise _fail(f"{why}: {stored_so_far} (--core publishes with plain NATS)", 1) from None
    raise _fail(
        f"no stream stores {subject}: {stored_so_far} (start the service first, it creates its streams; "
        "--core publishes with plain NATS)",
        1,
    )


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
    from stanchion.handlers.classify.policy import resolve_policy
    from stanchion.handlers.runtime.redact import environment_secrets

    settings = _configure()
    try:
        policy, predicates = resolve_policy(settings)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
    secrets = [*settings.secrets(), *environment_secrets()]
    configure_logging(settings.log_level if verbose else "error", settings.log_format, secrets)
    models = ", ".join(f"{m.name} ({m.model})" for m in policy.models) or "none"
    out.print(f"models: {models}; then the keyword heuristic")
    with nats_server(settings) as url:
        ok = asyncio.run(_demo(settings.model_copy(update={"nats_url": url}), policy, predicates, url, timeout))
    if not ok:
        raise typer.Exit(1)


async def _demo(settings: Settings, policy: Any, predicates: Any, url: str, wait_s: float) -> bool:
    from stanchion.handlers.classify.app import create_app
    from stanchion.handlers.observability.report import gather, render

    await _check_nats(url, settings)
    try:
        app, _ = create_app(settings, policy, url=url, predicates=predicates)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None
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
    handler: Annotated[str | None, typer.Option("--handler", help="Only this handler (by name).")] = None,
    every: Annotated[bool, typer.Option("--all", hidden=True, help="Every handler (the default now).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """The production report, per handler: each running replica's figures and their combined table (calls, success
    rate, p50/p95/p99 latency, cost per call and in total against STANCHION_BUDGET_USD, fallbacks, breakers)."""
    settings = _configure(NATS_CONNECTION | {"budget_usd", "breaker_bucket"})
    url = _require_nats(settings, "report")
    asyncio.run(_report(settings, url, wait, handler, as_json))


async def _report(settings: Settings, url: str, wait_s: float, handler: str | None, as_json: bool) -> None:
    from stanchion.handlers.observability.report import by_handler, combine, gather, render

    await _check_nats(url, settings)
    from stanchion.handlers.nats.breakers import read_breakers
    from stanchion.handlers.observability.report import shared_breakers

    nc = await _connect(url, settings)
    try:
        replicas = await gather(nc, handler=handler, wait_s=wait_s)
        # The breakers the replicas share (STANCHION_BREAKER_STORE=kv): one state, read once, not one per replica.
        shared = await read_breakers(nc.jetstream(), settings.breaker_bucket) if replicas else {}
    finally:
        await nc.close()
    if as_json:
        figures = {
            "handlers": [
                {
                    "handler": name,
                    "subject": group[0].subject,
                    "durable": durable,
                    "replicas": [r.to_dict() for r in group],
                    "combined": combine(group).to_dict(),
                    **({"shared_breakers": shared_breakers(shared, name)} if shared else {}),
                }
                for (name, durable), group in by_handler(replicas).items()
            ],
            "replicas": [r.to_dict() for r in replicas],
            "combined": combine(replicas).to_dict(),
            "budget_usd": settings.budget_usd,
        }
        out.print_json(json.dumps(figures))
    else:
        render(replicas, out, settings.budget_usd, shared)
    if not replicas:
        raise typer.Exit(1)


dlq = typer.Typer(help="Dead letters: list them, replay them.", no_args_is_help=True)
cli.add_typer(dlq, name="dlq")


def _require_nats(settings: Settings, what: str = "the dead-letter tools") -> str:
    if not settings.nats_url:
        raise _fail(f"configuration error: NATS_URL is not set: {what} needs a running server")
    return settings.nats_url


AppOption = Annotated[
    str | None,
    typer.Option("--app", metavar="MODULE:APP", help="The app that declares the handler (default: the classifier)."),
]
HandlerOption = Annotated[str | None, typer.Option("--handler", help="The handler by name (default: the app's only).")]
StreamOption = Annotated[
    str | None, typer.Option("--stream", help="A dead-letter stream by name, instead of a handler's.")
]


def _handler(settings: Settings, target: str | None, name: str | None) -> Any:
    """The declared handler ``name`` of the app ``target`` (default: the classifier); built, never started."""
    from stanchion.handlers.api import Stanchion
    from stanchion.handlers.process import import_app

    try:
        if target is None:
            from stanchion.handlers.classify.app import create_app

            app, handler = create_app(settings)
            if name is None or name == handler.name:
                return handler
        else:
            app = import_app(target)
        reliable = app.context.get("stanchion")
        if not isinstance(reliable, Stanchion):
            raise ConfigError(f"--app: {target} declares no stanchion handlers")
        handlers = reliable.handlers
        if name is None:
            if len(handlers) != 1:
                raise ConfigError(f"--handler: the app has {len(handlers)} handlers: {', '.join(handlers)}")
            return next(iter(handlers.values()))
        if name not in handlers:
            raise ConfigError(f"--handler: no handler {name!r} (the app has {', '.join(handlers) or 'none'})")
        return handlers[name]
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None


def _dlq_fields(app: str | None, handler: str | None) -> frozenset[str] | None:
    """What a dlq command reads: the connection and the classifier's dead-letter stream; everything when it builds
    a handler (``--app`` / ``--handler``)."""
    return NATS_CONNECTION | {"dlq_stream"} if app is None and handler is None else None


def _dlq_stream(settings: Settings, target: str | None, name: str | None, stream: str | None) -> str:
    if stream is not None:
        if target is not None or name is not None:
            raise _fail("give either --stream or --app/--handler")
        return stream
    if target is None and name is None:
        return settings.dlq_stream  # the classifier's, without building it
    return str(_handler(settings, target, name).settings.dlq_stream)


@dlq.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest last.")] = 100,
    app: AppOption = None,
    handler: HandlerOption = None,
    stream: StreamOption = None,
) -> None:
    """Table of the dead letters of a handler (default: the classifier): reason, subject, deliveries, age."""
    settings = _configure(_dlq_fields(app, handler))
    url = _require_nats(settings)
    asyncio.run(_dlq_list(settings, url, _dlq_stream(settings, app, handler, stream), limit))


async def _dlq_list(settings: Settings, url: str, stream: str, limit: int) -> None:
    from stanchion.handlers.nats.dlq import dead_letters

    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    try:
        letters = [letter async for letter in dead_letters(nc.jetstream(), stream)]
    except NotFoundError:
        letters = []
    finally:
        await nc.close()
    shown = letters[-limit:]
    table = Table(title=f"dead letters in {stream}: {len(letters)}")
    for column in ("seq", "event id", "handler", "error", "reason", "subject", "deliveries", "age"):
        table.add_column(column, overflow="fold")
    now = datetime.now(UTC)
    for letter in shown:
        dead = letter.dead
        table.add_row(
            str(letter.seq),
            dead.event_id or "-",
            dead.handler or "-",
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
            help="Replay only what the handler running this policy file could answer (skip poison, and events "
            "whose route offers no untried model and no heuristic).",
        ),
    ] = None,
    app: AppOption = None,
    handler: HandlerOption = None,
    stream: StreamOption = None,
) -> None:
    """Republish dead letters to their original subject (they keep their id) and remove them from the stream."""
    if (event_id is None) == (not replay_all):
        raise _fail("give either --id ID or --all")
    settings = _configure(_dlq_fields(app, handler) if policy_file is None else None)
    url = _require_nats(settings)
    check: Callable[[DeadLetter], str | None] | None = None
    if policy_file is not None:
        if stream is not None:
            raise _fail("--policy needs the handler (--app/--handler), not --stream")
        declared = _handler(settings, app, handler)
        try:
            policy, predicates = declared.load_policy(policy_file, "--policy")
        except ConfigError as exc:
            raise _fail(f"configuration error: {exc}") from None
        check = _answerable(declared, policy, predicates)
        dlq_stream = str(declared.settings.dlq_stream)
    else:
        dlq_stream = _dlq_stream(settings, app, handler, stream)
    replayed = asyncio.run(_dlq_replay(settings, url, dlq_stream, event_id, check))
    if event_id is not None and replayed == 0:
        raise _fail(f"no replayable dead letter with id {event_id!r}", 1)


def _answerable(handler: Any, policy: Any, predicates: Any) -> Callable[[DeadLetter], str | None]:
    """Why the handler, running ``policy``, could not answer a dead letter if replayed (``None`` when it could).

    Poison never becomes answerable. An event that failed permanently (``failed``) needs a route under the policy
    that allows the heuristic (and the handler has one) or offers a candidate it has not already failed on; one
    that failed transiently (``exhausted``, ``internal``) may succeed on the same candidates now.
    """
    from stanchion.handlers.api import routing_rules
    from stanchion.handlers.nats.dlq import original_payload
    from stanchion.handlers.runtime.decode import Poison

    try:
        resolved = policy.section(handler.name)
        rules = routing_rules(handler.name, resolved, predicates)
    except ConfigError as exc:
        raise _fail(f"configuration error: {exc}") from None

    def why_not(dead: DeadLetter) -> str | None:
        if dead.error_type.startswith("poison."):
            return f"{dead.error_type}: the payload itself is invalid"
        event = handler.runtime.decoder(original_payload(dead))
        if isinstance(event, Poison):
            return f"the payload is not a valid event: {event.reason}"
        route_name = next((rule.route for rule in rules if rule.matches(event)), resolved.default_route)
        route = resolved.routes[route_name]
        fresh = [m for m in route.models if m not in dead.models_tried]
        if dead.error_type != "failed" or (route.heuristic and handler.has_heuristic) or fresh:
            return None
        return f"route {route_name!r} offers only {', '.join(route.models) or 'no models'}, all tried already"

    return why_not


async def _dlq_replay(
    settings: Settings, url: str, stream: str, event_id: str | None, check: Callable[[DeadLetter], str | None] | None
) -> int:
    from stanchion.handlers.nats.dlq import dead_letters, replay

    await _check_nats(url, settings)
    nc = await _connect(url, settings)
    js = nc.jetstream()
    replayed = skipped = 0
    try:
        letters = [
            letter async for letter in dead_letters(js, stream) if event_id is None or letter.dead.event_id == event_id
        ]
        for letter in letters:
            if check is not None and (why := check(letter.dead)) is not None:
                err.print(f"skipped {letter.seq} ({letter.dead.event_id}): {why}", markup=False)
                skipped += 1
                continue
            try:
                await replay(js, stream, letter)
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
