"""The public API: ``Stanchion`` on a user's ``NatsBroker``, and ``@reliable.agent(...)`` handlers on it.

Each handler is generic over its event type (any pydantic model) and its output type (the agent's
``output_type``); every message-level guarantee (see ARCHITECTURE.md) is the same for every handler.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog
from faststream import AckPolicy, FastStream
from faststream.nats import NatsBroker, NatsMessage, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.specification import AsyncAPI
from opentelemetry import metrics
from opentelemetry.metrics import NoOpMeterProvider
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings

from stanchion.contracts import DeadLetter, ResultEnvelope
from stanchion.handlers.errors import ConfigError
from stanchion.handlers.models.providers import build_candidates, close_models
from stanchion.handlers.models.stack import build_stack
from stanchion.handlers.models.terminal import AgentTerminal
from stanchion.handlers.nats.breakers import KeyValueBreakerStore
from stanchion.handlers.nats.broker import delivery_count, raw_body
from stanchion.handlers.nats.loop import DRAIN_WAIT_S, HAND_BACK_DELAY_S, PULL_TIMEOUT_S, MessageLoop
from stanchion.handlers.nats.results import KeyValueResultStore
from stanchion.handlers.nats.streams import (
    consumer_config,
    input_stream,
    max_ack_pending,
    output_stream,
    pull_batch,
    reconcile_consumer,
    recreate_stream,
    stream_prefix,
)
from stanchion.handlers.observability.health import HealthServer
from stanchion.handlers.observability.logs import LlmCallLog
from stanchion.handlers.observability.metrics import Metrics
from stanchion.handlers.observability.report import register as register_stats
from stanchion.handlers.observability.stats import ServiceStats
from stanchion.handlers.observability.telemetry import TelemetryMiddleware
from stanchion.handlers.policy import Policy, ResolvedPolicy, load_policy
from stanchion.handlers.runtime.decode import Decoder, EventId, id_field
from stanchion.handlers.runtime.handler import HandlerRuntime
from stanchion.handlers.runtime.redact import Redactor
from stanchion.handlers.runtime.redelivery import RedeliveryPolicy
from stanchion.handlers.runtime.results import ResultStore
from stanchion.handlers.settings import Settings, load_settings
from stanchion.middleware import (
    SYSTEM_CLOCK,
    AttemptRecorder,
    BreakerStore,
    Bulkhead,
    Call,
    Candidate,
    CircuitBreaker,
    Clock,
    InMemoryBreakerStore,
    Rule,
    Terminal,
)

EventT = TypeVar("EventT", bound=BaseModel)
PromptEventT = TypeVar("PromptEventT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)

Predicate = Callable[[Any], bool | str | None]
"""A routing predicate over the event: true (or a reason, in words) sends the event to the rule's route."""

PolicyLoader = Callable[[Path, str], tuple[Policy, Mapping[str, Predicate]]]

log = structlog.get_logger("stanchion.app")

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def derived_name(subject: str) -> str:
    """A handler's default name: its input subject with every run of other characters made ``-``."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", subject).strip("-") or "handler"


class Declaration(Generic[OutputT]):
    """What ``Stanchion.agent(...)`` returns: applied to the prompt function, it declares the handler."""

    def __init__(self, declare: Callable[[Callable[[Any], str]], Handler[Any, OutputT]]) -> None:
        self._declare = declare

    def __call__(self, prompt: Callable[[PromptEventT], str], /) -> Handler[PromptEventT, OutputT]:
        return self._declare(prompt)


class Handler(Generic[EventT, OutputT]):
    """One declared handler: its settings (subjects, streams, limits), its runtime, and its message loop.

    Calling it calls the prompt function it decorated.
    """

    def __init__(
        self,
        *,
        name: str,
        settings: Settings,
        prompt: Callable[[EventT], str],
        runtime: HandlerRuntime[EventT, OutputT],
        loop: MessageLoop,
        terminal: Terminal[OutputT],
        candidates: Mapping[str, Candidate],
        owns_candidates: bool,
        policy: ResolvedPolicy,
        predicates: Mapping[str, Predicate],
        has_heuristic: bool,
    ) -> None:
        self.name = name
        self.settings = settings
        self.prompt = prompt
        self.runtime = runtime
        self.loop = loop
        self.terminal = terminal
        self.candidates = dict(candidates)
        self.owns_candidates = owns_candidates
        self.policy = policy
        self.predicates = dict(predicates)
        self.has_heuristic = has_heuristic
        self.policy_loader: PolicyLoader | None = None
        """Reads a policy file for this handler (``None``: ``load_policy``, with the declared predicates)."""

    def load_policy(self, path: Path, setting: str = "policy") -> tuple[Policy, Mapping[str, Predicate]]:
        """A policy file as this handler reads it, and the predicates its rules may name."""
        if self.policy_loader is not None:
            return self.policy_loader(path, setting)
        return load_policy(path, setting=setting), self.predicates

    def __call__(self, event: EventT) -> str:
        return self.prompt(event)

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The breaker of provider health (transient failures), keyed by model."""
        return self.runtime.breakers[0] if self.runtime.breakers else None

    @property
    def quality_breaker(self) -> CircuitBreaker | None:
        """The breaker of output quality (invalid output), keyed by this handler and model."""
        return self.runtime.breakers[1] if len(self.runtime.breakers) > 1 else None

    @property
    def stats(self) -> ServiceStats:
        return self.runtime.stats

    async def aclose(self) -> None:
        """Close the provider clients this handler built (candidates passed in are the caller's to close)."""
        if self.owns_candidates:
            await close_models(self.candidates.values())


class Stanchion:
    """Reliable, typed LLM handlers on a FastStream ``NatsBroker``.

    Args:
        broker: The user's broker (``stanchion.create_broker(settings)`` builds one from ``NATS_URL`` & co.).
        policy: The models and routing: a ``Policy``, or a TOML file; ``None``: ``STANCHION_POLICY`` when set.
            A handler may bring its own.
        settings: Defaults of every handler (``None``: read from the environment; a bad value raises
            ``ConfigError`` naming the variable).
        clock: Time source of every stack, pause and deadline.
        results: Where answered events are kept (default: the NATS KV bucket ``STANCHION_RESULT_BUCKET``).
        breaker_store: Where the breakers keep their state, shared by every handler (default: the NATS KV bucket
            ``STANCHION_BREAKER_BUCKET``, shared by the replicas, when ``settings.shared_breakers``; else in memory,
            for this process).
    """

    def __init__(
        self,
        broker: NatsBroker,
        *,
        policy: Policy | str | Path | None = None,
        settings: Settings | None = None,
        clock: Clock = SYSTEM_CLOCK,
        results: ResultStore | None = None,
        breaker_store: BreakerStore | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings if settings is not None else load_settings()
        self.policy = self._load(policy) if policy is not None else None
        if self.policy is None and self.settings.policy is not None:
            self.policy = load_policy(self.settings.policy)
        self.clock = clock
        self.breaker_store: BreakerStore = breaker_store or self._default_breakers()
        self.bulkhead = Bulkhead()  # every handler of this process calling a model shares its slots
        self.handlers: dict[str, Handler[Any, Any]] = {}
        self.results: ResultStore = results or self._kv_results()
        self.metrics = Metrics(metrics.get_meter_provider()) if self.settings.otel_endpoint else None
        self._stats_services: list[Any] = []
        self._ready = False
        self._health: HealthServer | None = None
        self._preflighted = False
        if self.settings.otel_endpoint and not any(
            isinstance(m, NatsTelemetryMiddleware | TelemetryMiddleware) for m in broker.config.broker_middlewares
        ):
            # Messaging spans and trace context in the headers, on a broker built without them.
            broker.insert_middleware(TelemetryMiddleware())

    @staticmethod
    def _load(policy: Policy | str | Path) -> Policy:
        return policy if isinstance(policy, Policy) else load_policy(Path(policy), setting="policy")

    def _kv_results(self) -> ResultStore:
        # Replicas and handlers share one KV bucket (keys scoped by handler); the connection opens later.
        state = self.broker.config.connection_state
        return KeyValueResultStore(
            lambda: state.connection,
            self.settings.result_bucket,
            self.settings.result_ttl_s,
            js=lambda: state.stream,
            replicas=self.settings.stream_replicas,  # a bucket recreated after a deletion keeps the deployment's
        )

    def _default_breakers(self) -> BreakerStore:
        if not self.settings.shared_breakers:
            return InMemoryBreakerStore()
        state = self.broker.config.connection_state  # connected later, like the results
        return KeyValueBreakerStore(
            lambda: state.connection,
            self.settings.breaker_bucket,
            replicas=self.settings.stream_replicas,
            js=lambda: state.stream,
        )

    # -- declaring handlers ----------------------------------------------------------------------

    def agent(
        self,
        subject: str,
        *,
        agent: Agent[Any, OutputT],
        output: str | None = None,
        dead_letters: str | None = None,
        name: str | None = None,
        event: type[BaseModel] | None = None,
        event_id: str | EventId = "id",
        heuristic: Callable[[Any], OutputT] | None = None,
        deadline: Callable[[Any], float | None] | None = None,
        rules: Mapping[str, Predicate] | None = None,
        deps: Callable[[Any], Any] | None = None,
        policy: Policy | str | Path | None = None,
        candidates: Mapping[str, Candidate] | None = None,
        terminal: Terminal[OutputT] | None = None,
        input_stream: str | None = None,
        output_stream: str | None = None,
        dlq_stream: str | None = None,
        durable: str | None = None,
        bind_streams: bool = False,
        max_in_flight: int | None = None,
        ack_wait_s: float | None = None,
        max_deliver: int | None = None,
        description: str | None = None,
    ) -> Declaration[OutputT]:
        """Declare a handler: events on ``subject`` answered by ``agent``, the prompt being the decorated function.

        Args:
            subject: The input subject.
            agent: Any pydantic-ai agent (tools and ``deps`` allowed); its ``output_type`` is the output.
            output: Where results go (default ``<subject>.results``).
            dead_letters: Where dead letters go (default ``dlq.<subject>``).
            name: The handler's name (default: the subject with ``.`` made ``-``): in envelopes, dead letters,
                logs, the report, and the policy file's ``[handlers.<name>]``.
            event: The event model (default: the prompt function's parameter annotation).
            event_id: The event's id: a field name (default ``id``) or a function of the event.
            heuristic: The non-LLM answer of last resort (``None``: no degraded answers).
            deadline: A tighter deadline of one event, in seconds (``None`` from it: the handler's deadline).
            rules: Routing predicates by name; the policy's ``rules`` map them to routes (without any, each goes
                to the route of its own name, when the policy has one).
            deps: The agent's ``deps`` for an event.
            policy: This handler's policy (default: the ``Stanchion``'s); its ``[handlers.<name>]`` section, or
                its top level, applies.
            candidates: The models, built in code (default: the policy's, on their providers' clients).
            terminal: The stack's innermost step (default: ``AgentTerminal(agent, prompt, deps=deps)``).
            input_stream / output_stream / dlq_stream / durable: JetStream names (default
                ``STANCHION_<NAME>_EVENTS`` / ``_RESULTS`` / ``_DLQ`` and ``stanchion-<name>``).
            bind_streams: Use the streams as they exist (an operator's): never create or update them.
            max_in_flight / ack_wait_s / max_deliver: Default ``STANCHION_MAX_IN_FLIGHT`` & co.
            description: For the AsyncAPI document.

        Raises:
            ConfigError: A bad name, an unknown rule or route, a model without its key or URL.
        """

        def declare(prompt: Callable[[Any], str]) -> Handler[Any, OutputT]:
            event_type = event or _event_type(prompt)
            handler_name = name or derived_name(subject)
            if not _NAME.match(handler_name):
                raise ConfigError(f"handler name {handler_name!r}: use letters, digits, '_' and '-' only")
            if handler_name in self.handlers:
                raise ConfigError(f"handler {handler_name!r} is declared twice")
            prefix = stream_prefix(handler_name)
            updates: dict[str, Any] = {
                "input_subject": subject,
                "output_subject": output or f"{subject}.results",
                "dlq_subject": dead_letters or f"dlq.{subject}",
                "input_stream": input_stream or f"{prefix}_EVENTS",
                "output_stream": output_stream or f"{prefix}_RESULTS",
                "dlq_stream": dlq_stream or f"{prefix}_DLQ",
                "durable": durable or f"stanchion-{handler_name}",
            }
            limits = {"max_in_flight": max_in_flight, "ack_wait_s": ack_wait_s, "max_deliver": max_deliver}
            updates.update({k: v for k, v in limits.items() if v is not None})
            settings = self.settings.model_copy(update=updates)
            handler = self._build(
                handler_name,
                settings,
                event_type=event_type,
                agent=agent,
                prompt=prompt,
                event_id=id_field(event_id) if isinstance(event_id, str) else event_id,
                heuristic=heuristic,
                deadline=deadline,
                rules=dict(rules or {}),
                deps=deps,
                policy=self._load(policy) if policy is not None else self.policy,
                candidates=candidates,
                terminal=terminal,
            )
            self._subscribe(handler, event_type, agent, bind_streams, description)
            self.handlers[handler_name] = handler
            return handler

        return Declaration(declare)

    def _build(
        self,
        name: str,
        settings: Settings,
        *,
        event_type: type[BaseModel],
        agent: Agent[Any, OutputT],
        prompt: Callable[[EventT], str],
        event_id: EventId,
        heuristic: Callable[[EventT], OutputT] | None,
        deadline: Callable[[EventT], float | None] | None,
        rules: dict[str, Predicate],
        deps: Callable[[EventT], Any] | None,
        policy: Policy | None,
        candidates: Mapping[str, Candidate] | None,
        terminal: Terminal[OutputT] | None,
    ) -> Handler[EventT, OutputT]:
        output_type: type[OutputT] = agent.output_type  # type: ignore[assignment]
        if not (isinstance(output_type, type) and issubclass(output_type, BaseModel)):
            raise ConfigError(f"handler {name!r}: the agent's output_type must be a pydantic model")
        resolved = (policy or Policy()).section(name)
        used = list(dict.fromkeys(m for route in resolved.routes.values() for m in route.models))
        owns = candidates is None
        if candidates is None:
            candidates = build_candidates(
                [resolved.model(m) for m in used],
                output_type,
                attempt_timeout_s=settings.attempt_timeout_s,
                output_retries=settings.output_retries,
            )
        elif missing := [m for m in used if m not in candidates]:
            raise ConfigError(f"handler {name!r}: no candidate for model(s) {', '.join(missing)} of its policy")
        tracing = settings.otel_endpoint is not None
        if tracing and agent.instrument is None:
            # pydantic-ai's spans, without its metrics (stanchion.llm.* count the same tokens and cost) and, unless
            # content is traced, without the request parameters (the output schema, serialised on every request).
            agent.instrument = InstrumentationSettings(
                include_content=settings.trace_content,
                include_model_request_parameters=settings.trace_content,
                meter_provider=NoOpMeterProvider(),
            )
        redact = Redactor(settings.secrets() + _model_secrets(resolved))
        stats = ServiceStats.for_this_process(handler=name, subject=settings.input_subject, durable=settings.durable)
        recorders: list[AttemptRecorder] = [LlmCallLog(), stats]
        if self.metrics is not None:
            recorders.append(self.metrics.add(name, settings.input_subject, stats))
        terminal = terminal or AgentTerminal(agent, prompt, deps=deps)
        metrics_ = self.metrics

        def breaker_changed(key: str, old: Any, new: Any) -> None:
            stats.breaker_changed(key, new.value)
            if metrics_ is not None:
                metrics_.breaker_changed(name, key, old.value, new.value)

        stack, breakers = build_stack(
            resolved,
            terminal,
            candidates,
            rules=routing_rules(name, resolved, rules),
            heuristic=_heuristic(heuristic) if heuristic is not None else None,
            attempt_timeout_s=settings.attempt_timeout_s,
            tracing=tracing,
            clock=self.clock,
            breaker_store=self.breaker_store,
            redact=redact,
            recorders=recorders,
            on_transition=[breaker_changed],
            handler=name,
            bulkhead=self.bulkhead,
        )
        runtime: HandlerRuntime[EventT, OutputT] = HandlerRuntime(
            name=name,
            decoder=Decoder(typing.cast(type[EventT], event_type), event_id, settings.max_payload_bytes),
            output_type=output_type,
            stack=stack,
            results=self.results,
            redelivery=RedeliveryPolicy(settings.nak_backoff_s, settings.max_deliver),
            redact=redact,
            breakers=breakers,
            deadline_s=resolved.deadline_s or settings.deadline_s,
            event_deadline=deadline,
            max_pause_s=settings.max_pause_s,
            retry_redeliveries=settings.retry_redeliveries,
            clock=self.clock,
            stats=stats,
        )
        loop = MessageLoop(
            runtime,
            publish_result=_unset_publisher,
            publish_dead=_unset_publisher,
            ack_wait_s=settings.ack_wait_s,
            max_pause_s=settings.max_pause_s,
            max_in_flight=settings.max_in_flight,
            clock=self.clock,
        )
        return Handler(
            name=name,
            settings=settings,
            prompt=prompt,
            runtime=runtime,
            loop=loop,
            terminal=terminal,
            candidates=candidates,
            owns_candidates=owns,
            policy=resolved,
            predicates=rules,
            has_heuristic=heuristic is not None,
        )

    def _subscribe(
        self,
        handler: Handler[Any, Any],
        event_type: type[BaseModel],
        agent: Agent[Any, Any],
        bind: bool,
        description: str | None,
    ) -> None:
        broker, settings, loop = self.broker, handler.settings, handler.loop
        output_type = handler.runtime.output_type
        result_stream = output_stream(settings.output_stream, settings.output_subject, settings, declare=not bind)
        dead_stream = output_stream(
            settings.dlq_stream, settings.dlq_subject, settings, dead_letters=True, declare=not bind
        )
        results = broker.publisher(
            settings.output_subject,
            stream=result_stream,
            schema=ResultEnvelope[output_type],  # type: ignore[valid-type]
            title=f"{handler.name}: results",
            description=f"One ResultEnvelope[{output_type.__name__}] per event. Nats-Msg-Id is the event id.",
        )
        dead = broker.publisher(
            settings.dlq_subject,
            stream=dead_stream,
            schema=DeadLetter,
            title=f"{handler.name}: dead letters",
            description="Events the handler could not answer, with their reason and payload.",
        )

        async def publish_result(body: bytes, headers: Mapping[str, str]) -> None:
            await results.publish(body, headers=dict(headers))

        async def publish_dead(body: bytes, headers: Mapping[str, str]) -> None:
            await dead.publish(body, headers=dict(headers))

        loop.publish_result, loop.publish_dead = publish_result, publish_dead
        if not bind:
            streams = {"results": result_stream, "dead_letters": dead_stream}

            async def repair(kind: str) -> None:
                """Recreate a deleted output or dead-letter stream with the configuration it was created with."""
                if await recreate_stream(broker.config.connection_state.stream, streams[kind]):
                    log.warning("recreated a missing stream", stream=streams[kind].name, handler=handler.name)

            loop.repair = repair

        async def consume(body: bytes) -> None:
            # The message from FastStream's context, not as a `msg: NatsMessage` parameter: FastDepends resolves such a
            # parameter with a synchronous function it runs in a worker thread, a thread hop for every message.
            msg: NatsMessage = broker.context.get_local("message")
            data = body if isinstance(body, bytes) else body.model_dump_json().encode()
            subject = msg.raw_message.subject or settings.input_subject
            bound = structlog.contextvars.bind_contextvars(handler=handler.name, subject=subject, event_id=None)
            try:
                await loop(msg, data, delivery_count(msg), subject)
            finally:
                structlog.contextvars.reset_contextvars(**bound)

        # The event type in the signature documents the subject in AsyncAPI; the raw decoder hands over bytes.
        consume.__annotations__ = {"body": event_type | bytes, "return": None}
        consume.__name__ = re.sub(r"\W", "_", handler.name)
        subscriber = broker.subscriber(
            settings.input_subject,
            stream=input_stream(settings, declare=not bind),
            durable=settings.durable,
            pull_sub=PullSub(batch_size=pull_batch(settings), timeout=PULL_TIMEOUT_S),
            config=consumer_config(settings),
            # Every unacked message gets a worker at once and waits at the loop's own gate of max_in_flight: none
            # waits inside FastStream, out of reach, when shutdown hands messages back.
            max_workers=max_ack_pending(settings),
            ack_policy=AckPolicy.MANUAL,
            decoder=raw_body,
            title=f"{handler.name}: events",
            description=description
            or f"{event_type.__name__} events for {agent.name or handler.name}. Anything else becomes a dead letter.",
        )
        subscriber(consume)

        async def drain() -> int:
            """Nak what nats-py buffered for the pull subscription (``subscription``: nats-py's, once started)."""
            pull = getattr(subscriber, "subscription", None)
            if pull is None or not pull.pending_msgs:
                return 0
            messages = await pull.fetch(batch=pull.pending_msgs, timeout=0.2)
            for message in messages:
                await message.nak(delay=HAND_BACK_DELAY_S)
            return len(messages)

        loop.drain = drain

    # -- the app's life cycle ----------------------------------------------------------------------

    def check(self) -> None:
        """Every ``[handlers.<name>]`` section of the policy names a declared handler (``ConfigError`` if not)."""
        if self.policy is not None and (unknown := sorted(set(self.policy.handlers) - set(self.handlers))):
            raise ConfigError(
                f"policy: [handlers.{unknown[0]}] names no declared handler "
                f"(declared: {', '.join(sorted(self.handlers)) or 'none'})"
            )

    def attach(self, app: FastStream) -> FastStream:
        """Register the handlers' start-up and shutdown work on ``app`` (its public hooks) and return it."""
        self.check()
        app.context.set_global("stanchion", self)  # for the CLI's dead-letter tools (`--app`)
        app.on_startup(self.preflight)  # before the broker starts: JetStream and the streams, one-line errors
        app.after_startup(self._started)
        app.on_shutdown(self._stopping)
        # After the broker stopped: the handlers still finishing during the grace period need the clients.
        app.after_shutdown(self.aclose)
        return app

    def app(self, *, title: str = "stanchion", version: str = "0.1.0", description: str | None = None) -> FastStream:
        """A FastStream app on the broker, with the handlers attached and an AsyncAPI document of them."""
        return self.attach(
            FastStream(
                self.broker,
                specification=AsyncAPI(
                    title=title,
                    version=version,
                    description=description or f"Handlers: {', '.join(self.handlers) or 'none'}.",
                ),
            )
        )

    async def preflight(self) -> None:
        """Connect the broker and check JetStream and every handler's streams (``ConfigError``, one line).

        Once per start: a caller that ran it first (``stanchion run``, so that a failure is the only line printed)
        spares the app's ``on_startup`` hook a second round.
        """
        from stanchion.handlers.nats.preflight import check_streams

        if not self._preflighted:
            await check_streams(self.broker, self.handlers)
            self._preflighted = True

    async def _started(self) -> None:
        """Bring every durable up to its settings; announce every handler's statistics (``stanchion report``)."""
        state = self.broker.config.connection_state
        if isinstance(self.breaker_store, KeyValueBreakerStore):
            await self.breaker_store.start()  # the bucket, the records, the watch (or a warning and local state)
        for handler in self.handlers.values():
            await reconcile_consumer(state.stream, handler.settings)
            self._stats_services.append(await register_stats(state.connection, handler.stats))
        self._ready = True
        if self.settings.health_port is not None and self._health is None:
            self._health = HealthServer(self.readiness, self.settings.health_host, self.settings.health_port)
            await self._health.start()

    def readiness(self) -> dict[str, Any]:
        """Whether this process is ready (started, connected, every handler consuming), and the figures behind it:
        what ``/readyz`` answers."""
        connection = self.broker.config.connection_state.connection if self._ready else None
        connected = bool(connection is not None and connection.is_connected)
        handlers = {
            name: {
                "consuming": self._ready and not h.loop.stopping,
                "paused": h.loop.pause.until > self.clock.now(),
                "waiting": h.loop.waiting,
            }
            for name, h in self.handlers.items()
        }
        ready = self._ready and connected and all(h["consuming"] for h in handlers.values())
        return {"ready": ready, "started": self._ready, "connected": connected, "handlers": handlers}

    async def _stopping(self) -> None:
        """Shutdown began (before the broker stops): every handler hands back what it holds; stats withdrawn."""
        self._preflighted = False  # a later start checks again
        self._ready = False  # /readyz fails from now on: an orchestrator sends nothing new our way
        for handler in self.handlers.values():
            handler.loop.stop(handler.settings.shutdown_grace_s)
        if self.handlers:
            # FastStream drops the messages a fetch returns once its subscriber stopped (``consume`` returns when not
            # running), and the broker stops its subscribers right after this hook. Let the fetch in progress return
            # while they still consume: what it brings is handed back by the loops (their settling is held meanwhile,
            # so the server has no free slot to deliver into the next one).
            grace = min(h.settings.shutdown_grace_s for h in self.handlers.values())
            await asyncio.sleep(min(DRAIN_WAIT_S, grace * 0.3))
        for service in self._stats_services:
            try:
                await service.stop()
            except Exception as exc:  # the connection may already be gone; nothing left to withdraw then
                log.debug("stats service not stopped", error=str(exc))
        self._stats_services.clear()

    async def aclose(self) -> None:
        """Close the provider clients the handlers built, and the health endpoint."""
        for handler in self.handlers.values():
            await handler.aclose()
        if isinstance(self.breaker_store, KeyValueBreakerStore):
            await self.breaker_store.aclose()  # stop watching the shared breakers
        if self._health is not None:
            await self._health.stop()
            self._health = None


def _event_type(prompt: Callable[..., Any]) -> type[BaseModel]:
    """The annotation of the prompt function's first parameter: the handler's event model."""
    parameters = list(inspect.signature(prompt).parameters)
    hints = typing.get_type_hints(prompt)
    event_type = hints.get(parameters[0]) if parameters else None
    if not (isinstance(event_type, type) and issubclass(event_type, BaseModel)):
        raise ConfigError(
            f"prompt {getattr(prompt, '__name__', prompt)!r}: annotate its parameter with the event model, "
            "or pass event=..."
        )
    return event_type


def _heuristic(answer: Callable[[EventT], OutputT]) -> Callable[[Call], Awaitable[OutputT]]:
    async def heuristic(call: Call) -> OutputT:
        return answer(call.event)

    return heuristic


def routing_rules(handler: str, policy: ResolvedPolicy, declared: Mapping[str, Predicate]) -> list[Rule]:
    """The routing rules: the policy's (each naming a declared predicate), else each predicate to its own route."""
    if policy.rules is None:
        return [Rule(name, when, name) for name, when in declared.items() if name in policy.routes]
    rules: list[Rule] = []
    for config in policy.rules:
        when = declared.get(config.predicate)
        if when is None:
            raise ConfigError(
                f"policy: rule for route {config.route!r} of handler {handler!r} names unknown predicate "
                f"{config.predicate!r} (declared: {', '.join(declared) or 'none'})"
            )
        rules.append(Rule(config.route, when, config.predicate))
    return rules


def _model_secrets(policy: ResolvedPolicy) -> list[str]:
    return [v for m in policy.models if m.api_key_env and (v := os.environ.get(m.api_key_env))]


async def _unset_publisher(body: bytes, headers: Mapping[str, str]) -> None:
    raise RuntimeError("the handler's publishers are set when it subscribes")
