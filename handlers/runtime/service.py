"""The classification service without the transport: bytes in, one outcome out.

``ClassifierService.handle`` validates the payload, runs the reliability stack and says what the
transport must do with the message: publish a result and ack, publish a dead letter and term, or
redeliver later. ``handlers.app`` is the FastStream adapter around it.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import metrics, trace
from opentelemetry.metrics import NoOpMeterProvider
from pydantic import ValidationError
from pydantic_ai.models.instrumented import InstrumentationSettings
from tenacity import stop_after_attempt, wait_exponential_jitter

from stanchion.contracts import DeadLetter, Decision, ResultEnvelope, TaskClassification, TaskEvent
from stanchion.handlers.classify.heuristic import classify as heuristic_classify
from stanchion.handlers.models.agent import AgentTerminal, build_agent, build_candidates, close_models
from stanchion.handlers.observability.logs import LlmCallLog
from stanchion.handlers.observability.metrics import Metrics
from stanchion.handlers.observability.stats import ServiceStats
from stanchion.handlers.observability.telemetry import current_trace_id
from stanchion.handlers.policy import BreakerConfig, Policy
from stanchion.handlers.runtime.redact import Redactor
from stanchion.handlers.runtime.results import InMemoryResultStore, ResultStore, StoredResult
from stanchion.handlers.settings import Settings
from stanchion.middleware import (
    SYSTEM_CLOCK,
    AllCandidatesFailed,
    AttemptRecorder,
    BreakerPolicy,
    BreakerStore,
    Call,
    Candidate,
    CircuitBreaker,
    Clock,
    Fallback,
    InMemoryBreakerStore,
    Middleware,
    NoCandidates,
    Observe,
    Retry,
    RetryPolicy,
    Route,
    RouteSpec,
    Rule,
    Stack,
    Terminal,
    Timeout,
    Tracing,
    describe,
    wait_hint,
)

log = structlog.get_logger("stanchion.service")

MAX_DEAD_PAYLOAD = 16 * 1024


@dataclass(frozen=True)
class Answered:
    """Publish the result, then ack.

    ``stored``: answered before, taken from the result store, no model called; ``published``: and its
    publication was confirmed, so only the ack is left to do.
    """

    envelope: ResultEnvelope[TaskClassification]
    stored: bool = False
    published: bool = False
    data: bytes = b""
    """The envelope as JSON, serialised once (empty: serialise ``envelope``)."""

    @property
    def body(self) -> bytes:
        return self.data or self.envelope.model_dump_json().encode()


@dataclass(frozen=True)
class DeadLettered:
    """Publish the dead letter, then term."""

    dead: DeadLetter


@dataclass(frozen=True)
class Redeliver:
    """Nothing answered, but later may: nak with ``delay_s``.

    ``pause_s`` is set when the failures said how long to wait (open circuits, ``Retry-After``): the
    transport should stop pulling for that long and try again without spending a delivery.
    """

    delay_s: float
    reason: str
    pause_s: float | None = None
    event_id: str | None = None


Outcome = Answered | DeadLettered | Redeliver


def outcome_event_id(outcome: Outcome) -> str | None:
    """The id of the event an outcome is about (``None`` for a payload that had none)."""
    if isinstance(outcome, Answered):
        return outcome.envelope.event_id
    if isinstance(outcome, DeadLettered):
        return outcome.dead.event_id
    return outcome.event_id


async def heuristic(call: Call) -> TaskClassification:
    """The keyword heuristic as the stack's answer of last resort."""
    event: TaskEvent = call.event
    return heuristic_classify(event)


def build_stack(
    settings: Settings,
    policy: Policy,
    *,
    terminal: Terminal[TaskClassification] | None = None,
    candidates: Mapping[str, Candidate] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    breaker_store: BreakerStore | None = None,
    redact: Callable[[str], str] | None = None,
    recorders: Sequence[AttemptRecorder] | None = None,
    on_transition: Sequence[Callable[[str, Any, Any], None]] = (),
) -> tuple[Stack[TaskClassification], CircuitBreaker]:
    """The stack of ARCHITECTURE.md, built from the policy: Tracing → Route → Fallback → Retry → CircuitBreaker →
    Observe → Timeout → the agent.

    ``recorders`` are told about every model call (default: the ``llm_call_completed`` log line);
    ``on_transition`` about every breaker state change (besides its log line). Tracing, attempt spans and
    pydantic-ai's instrumentation are on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
    """
    if candidates is None:
        candidates = build_candidates(
            policy, attempt_timeout_s=settings.attempt_timeout_s, output_retries=settings.output_retries
        )
    routes = {
        name: RouteSpec(tuple(candidates[m] for m in route.models), route.heuristic)
        for name, route in policy.routes.items()
    }
    rules = [Rule(r.route, frozenset(r.kinds), r.min_text_length) for r in policy.rules]
    retry = {
        name: RetryPolicy(
            stop=stop_after_attempt(route.retry.attempts),
            wait=wait_exponential_jitter(
                multiplier=route.retry.initial_s, max=route.retry.max_s, jitter=route.retry.jitter_s
            ),
            max_retry_after=route.retry.max_retry_after_s,
        )
        for name, route in policy.routes.items()
    }
    timeouts = {name: route.timeout.attempt_s or settings.attempt_timeout_s for name, route in policy.routes.items()}

    def breaker_policy(config: BreakerConfig) -> BreakerPolicy:
        return BreakerPolicy(
            consecutive_failures=config.consecutive_failures,
            failure_rate=config.failure_rate,
            window=config.window,
            min_calls=config.min_calls,
            open_for=config.open_s,
            half_open_probes=config.half_open_probes,
        )

    breaker = CircuitBreaker(
        policy=breaker_policy(policy.breaker),
        per_candidate={m.name: breaker_policy(m.breaker) for m in policy.models if m.breaker is not None},
        store=breaker_store or InMemoryBreakerStore(),
        clock=clock,
        on_transition=[_log_transition, *on_transition],
    )
    tracing_on = settings.otel_endpoint is not None
    redact = redact or Redactor(settings.secrets())
    model_names = {m.name: m.model for m in policy.models}
    middleware: list[Middleware[TaskClassification]] = [
        # Tracing only when an exporter is configured: without one its spans would be no-ops anyway.
        *([Tracing(redact=redact, annotate_current=True)] if tracing_on else []),
        Route(routes, rules, policy.default_route),
        Fallback(heuristic),
        Retry(per_route=retry),
        breaker,
        Observe(
            recorders=[LlmCallLog()] if recorders is None else recorders,
            tracer=trace.get_tracer("stanchion") if tracing_on else None,
            model_of=lambda candidate: model_names.get(candidate.name, candidate.name),
            redact=redact,
        ),
        Timeout(settings.attempt_timeout_s, per_route=timeouts),
    ]
    # pydantic-ai's spans, without its metrics (the stanchion.llm.* instruments count the same tokens and cost per
    # candidate) and, unless content is traced, without the request parameters (the output tool's JSON schema,
    # serialised on every request: the largest share of the instrumentation's CPU).
    instrument = (
        InstrumentationSettings(
            include_content=settings.trace_content,
            include_model_request_parameters=settings.trace_content,
            meter_provider=NoOpMeterProvider(),
        )
        if tracing_on
        else False
    )
    return Stack(middleware, terminal or AgentTerminal(build_agent(instrument=instrument))), breaker


def _log_transition(key: str, old: Any, new: Any) -> None:
    log.warning("circuit breaker changed state", candidate=key, old=old.value, new=new.value)


class ClassifierService:
    """Bytes in, one ``Outcome`` out. Holds the long-lived parts: settings, policy, stack, breakers.

    Args:
        settings: Service settings.
        policy: The resolved policy.
        stack: A prebuilt stack (built from the policy when ``None``).
        clock: Time source for the stack and deadlines.
    """

    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        *,
        stack: Stack[TaskClassification] | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Clock = SYSTEM_CLOCK,
        results: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.clock = clock
        self.results: ResultStore = results or InMemoryResultStore()
        self.results_given = results is not None
        """Whether the caller chose the result store (``create_app`` replaces only the default one)."""
        self.redact = Redactor(settings.secrets() + policy_secrets(policy))
        self.stats = ServiceStats.for_this_process()
        self.metrics: Metrics | None = None
        if settings.otel_endpoint:
            self.metrics = Metrics(metrics.get_meter_provider(), self.stats, settings.input_subject)
        self.candidates: dict[str, Candidate] = {}
        """The model candidates this service built from the policy (none when a stack is passed in)."""
        if stack is None:
            recorders: list[AttemptRecorder] = [LlmCallLog(), self.stats, *([self.metrics] if self.metrics else [])]
            self.candidates = build_candidates(
                policy, attempt_timeout_s=settings.attempt_timeout_s, output_retries=settings.output_retries
            )
            stack, breaker = build_stack(
                settings,
                policy,
                candidates=self.candidates,
                clock=clock,
                redact=self.redact,
                recorders=recorders,
                on_transition=[self._breaker_changed],
            )
        self.stack = stack
        self.breaker = breaker
        self.deadline_s = policy.deadline_s or settings.deadline_s

    async def aclose(self) -> None:
        """Close the provider clients this service built (a stack passed in is the caller's to close)."""
        await close_models(self.candidates.values())

    async def handle(
        self,
        data: bytes,
        *,
        subject: str,
        headers: Mapping[str, str] | None = None,
        delivery: int = 1,
        retry: bool = True,
    ) -> Outcome:
        """Validate, classify, and say what to do with the message.

        Every log line written meanwhile carries ``subject`` (and ``event_id`` once known); the outcome is
        counted in ``stats`` (and the metrics, when exported).

        Args:
            data: The payload as received.
            subject: Where it arrived.
            headers: Its headers.
            delivery: Its delivery count; a redelivery gets no in-process retries unless
                ``STANCHION_RETRY_REDELIVERIES`` (the redelivery is the retry).
            retry: ``False`` turns in-process retries off for this call (e.g. when retrying after a pause).
        """
        started = self.clock.now()
        tokens = structlog.contextvars.bind_contextvars(subject=subject, event_id=None)
        call: Call | None = None
        try:
            outcome, call = await self._handle(data, subject, headers, delivery, retry, started)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
        self._count(outcome, call, self.clock.now() - started)
        return outcome

    def _count(self, outcome: Outcome, call: Call | None, latency_s: float) -> None:
        if isinstance(outcome, Answered):
            kind, error_type = ("stored" if outcome.stored else "answered"), None
        elif isinstance(outcome, DeadLettered):
            kind, error_type = "dead_letter", outcome.dead.error_type
        else:
            kind, error_type = "redelivered", None
        self.stats.event_finished(outcome=kind, latency_s=latency_s, call=call, error_type=error_type)

    def _breaker_changed(self, key: str, old: Any, new: Any) -> None:
        self.stats.breaker_changed(key, new.value)
        if self.metrics is not None:
            self.metrics.breaker_changed(key, old.value, new.value)

    async def _handle(
        self,
        data: bytes,
        subject: str,
        headers: Mapping[str, str] | None,
        delivery: int,
        retry: bool,
        started: float,
    ) -> tuple[Outcome, Call | None]:
        event_or_dead = self.validate(data, subject=subject, delivery=delivery)
        if isinstance(event_or_dead, DeadLetter):
            return DeadLettered(event_or_dead), None
        event = event_or_dead
        structlog.contextvars.bind_contextvars(event_id=event.id)
        if (stored := await self.results.get(event.id)) is not None:
            log.info("already answered; no model call", delivery=delivery, published=stored.published)
            envelope = ResultEnvelope[TaskClassification].model_validate_json(stored.envelope)
            return Answered(envelope, stored=True, published=stored.published, data=stored.envelope), None
        call = Call(
            event=event,
            subject=subject,
            headers=dict(headers or {}),
            clock=self.clock,
            timeout=self.deadline_s,
            delivery=delivery,
            may_retry=retry and (delivery == 1 or self.settings.retry_redeliveries),
        )
        if event.deadline_ms is not None:
            call.tighten_deadline(event.deadline_ms / 1000)
        try:
            output = await self.stack(call)
        except (AllCandidatesFailed, NoCandidates) as exc:
            return await self._failed(exc, call, data, subject, delivery), call
        envelope = ResultEnvelope[TaskClassification](
            event_id=event.id,
            result=output,
            model=call.served_by or "unknown",
            degraded=call.degraded,
            attempts=call.attempts,
            latency_ms=round((self.clock.now() - started) * 1000, 3),
            usage=call.usage,
            cost_usd=call.cost_usd,
            trace_id=call.trace_id,
            decisions=[self._redacted(d) for d in call.decisions],
        )
        body = envelope.model_dump_json().encode()
        await self.results.put(event.id, StoredResult(body, published=False))
        return Answered(envelope, data=body), call

    async def published(self, envelope: ResultEnvelope[TaskClassification], data: bytes = b"") -> None:
        """Record that the output stream confirmed this result: a redelivery will only ack."""
        body = data or envelope.model_dump_json().encode()
        await self.results.put(envelope.event_id, StoredResult(body, published=True))

    async def _all_circuits_open_for(self, candidates: list[str]) -> float | None:
        """When every candidate tried now has an open circuit: how long until the first may be tried again."""
        if self.breaker is None or not candidates:
            return None
        waits = [await self.breaker.rejecting_for(name) for name in set(candidates)]
        if any(wait is None for wait in waits):
            return None
        return min(min(w for w in waits if w is not None), self.settings.max_pause_s)

    def _redacted(self, decision: Decision) -> Decision:
        detail = self.redact(decision.detail)
        return decision if detail == decision.detail else decision.model_copy(update={"detail": detail})

    def validate(self, data: bytes, *, subject: str, delivery: int = 1) -> TaskEvent | DeadLetter:
        """The event, or the dead letter saying why the payload is poison."""
        if len(data) > self.settings.max_payload_bytes:
            return self._poison(
                data,
                subject,
                delivery,
                "poison.too_large",
                f"payload is {len(data)} bytes; the limit is {self.settings.max_payload_bytes}",
            )
        if not data.strip():
            return self._poison(data, subject, delivery, "poison.empty", "payload is empty")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._poison(
                data,
                subject,
                delivery,
                "poison.encoding",
                f"payload is not UTF-8: {exc.reason} at byte {exc.start}",
            )
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._poison(
                data,
                subject,
                delivery,
                "poison.json",
                f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            )
        except (RecursionError, ValueError) as exc:  # nesting too deep for the parser, or numbers too long
            reason = (
                "payload is nested too deeply" if isinstance(exc, RecursionError) else f"payload is not JSON: {exc}"
            )
            return self._poison(data, subject, delivery, "poison.json", reason)
        try:
            return TaskEvent.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:5]
            )
            event_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            return self._poison(
                data, subject, delivery, "poison.schema", f"payload is not a TaskEvent: {problems}", event_id
            )

    def dead_letter(
        self,
        data: bytes,
        *,
        subject: str,
        error_type: str,
        reason: str,
        event_id: str | None = None,
        delivery: int = 1,
        models_tried: list[str] | None = None,
        attempts: int = 0,
        errors: list[str] | None = None,
        trace_id: str | None = None,
    ) -> DeadLetter:
        """A dead letter keeping the payload (as text, or base64 when not UTF-8), truncated when huge."""
        kept = data[:MAX_DEAD_PAYLOAD]
        redacted = False
        try:
            text = kept.decode("utf-8")
            payload, encoding = self.redact(text), "utf-8"
            redacted = payload != text
        except UnicodeDecodeError:
            # latin-1 maps bytes 1:1, so it finds a secret inside any bytes; then keep only masked, lossy text.
            as_latin1 = kept.decode("latin-1")
            if self.redact(as_latin1) != as_latin1:
                payload, encoding, redacted = self.redact(kept.decode("utf-8", errors="replace")), "utf-8", True
            else:
                payload, encoding = base64.b64encode(kept).decode("ascii"), "base64"
        return DeadLetter(
            subject=subject,
            event_id=event_id,
            reason=self.redact(reason),
            error_type=error_type,
            payload=payload,
            payload_truncated=len(data) > MAX_DEAD_PAYLOAD,
            payload_redacted=redacted,
            payload_encoding=encoding,
            models_tried=models_tried or [],
            attempts=attempts,
            deliveries=delivery,
            errors=[self.redact(e) for e in errors or []],
            trace_id=trace_id or current_trace_id(),
        )

    def _poison(
        self,
        data: bytes,
        subject: str,
        delivery: int,
        error_type: str,
        reason: str,
        event_id: str | None = None,
    ) -> DeadLetter:
        log.warning(
            "poison message",
            error_type=error_type,
            reason=self.redact(reason),
            subject=subject,
            event_id=event_id,
        )
        return self.dead_letter(
            data, subject=subject, error_type=error_type, reason=reason, event_id=event_id, delivery=delivery
        )

    async def _failed(self, exc: Exception, call: Call, data: bytes, subject: str, delivery: int) -> Outcome:
        causes = list(exc.exceptions) if isinstance(exc, AllCandidatesFailed) else [exc]
        transient = isinstance(exc, AllCandidatesFailed) and exc.transient
        event: TaskEvent = call.event
        if transient and delivery < self.settings.max_deliver:
            # Pause only when every candidate said how long to wait (Retry-After, or an open circuit): one
            # candidate's open circuit beside another's one-off 500 is no reason to stop all work.
            waits = [wait_hint(cause) for cause in causes]
            hint = min(w for w in waits if w is not None) if waits and None not in waits else None
            if hint is None:
                hint = await self._all_circuits_open_for(call.models_tried)
            backoff = self.settings.nak_backoff_s
            delay = backoff[min(delivery, len(backoff)) - 1] if backoff else 0.0
            if hint is not None:
                delay = max(delay, hint)
            log.warning(
                "every candidate failed; redelivering later",
                event_id=event.id,
                delivery=delivery,
                delay_s=delay,
                pause_s=hint,
                error=self.redact(describe(exc)),
            )
            return Redeliver(delay, self.redact(describe(exc)), pause_s=hint, event_id=event.id)
        error_type = "exhausted" if transient else "failed"
        reason = (
            f"every candidate failed after {delivery} deliveries" if transient else "every candidate failed permanently"
        )
        return DeadLettered(
            self.dead_letter(
                data,
                subject=subject,
                error_type=error_type,
                reason=reason,
                event_id=event.id,
                delivery=delivery,
                models_tried=list(dict.fromkeys(call.models_tried)),
                attempts=call.attempts,
                errors=[describe(c) for c in causes],
                trace_id=call.trace_id,
            )
        )


def policy_secrets(policy: Policy) -> list[str]:
    return [v for m in policy.models if m.api_key_env and (v := os.environ.get(m.api_key_env))]
