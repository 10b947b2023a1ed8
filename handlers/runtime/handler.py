"""One handler without the transport: bytes in, one ``Outcome`` out. Generic over the event and output types.

``HandlerRuntime.handle`` decodes the payload, answers from the result store when the event was answered
before, runs the reliability stack otherwise, and says what the transport must do with the message. The
NATS wiring (``stanchion.handlers.nats``) is the only caller in production; tests call it directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import structlog
from opentelemetry import metrics
from pydantic import BaseModel, ValidationError

from stanchion.contracts import DeadLetter, Decision, ResultEnvelope
from stanchion.handlers.observability.stats import ServiceStats
from stanchion.handlers.observability.telemetry import current_trace_id
from stanchion.handlers.runtime.dead_letters import DeadLetters
from stanchion.handlers.runtime.decode import Decoder, Poison, validation_problems
from stanchion.handlers.runtime.outcome import Answered, DeadLettered, Outcome, Redeliver
from stanchion.handlers.runtime.redelivery import RedeliveryPolicy
from stanchion.handlers.runtime.results import ResultStore, StoredResult
from stanchion.middleware import (
    SYSTEM_CLOCK,
    AllCandidatesFailed,
    Call,
    CircuitBreaker,
    Clock,
    NoCandidates,
    Stack,
    describe,
    wait_hint,
)

EventT = TypeVar("EventT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)

log = structlog.get_logger("stanchion.handler")


def _mask_strings(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_mask_strings(v, redact) for v in value]
    if isinstance(value, dict):
        return {k: _mask_strings(v, redact) for k, v in value.items()}
    return value


def content_digest(event: BaseModel) -> str:
    """SHA-256 (hex) of the validated event's canonical JSON: with the handler and the id, the event's identity."""
    return hashlib.sha256(event.model_dump_json().encode()).hexdigest()


class HandlerRuntime(Generic[EventT, OutputT]):
    """Bytes in, one ``Outcome`` out, for one handler. Holds its long-lived parts: decoder, stack, store, stats.

    Args:
        name: The handler's name: in envelopes, dead letters, stats, and the scope of its stored results.
        decoder: Payload to event.
        output_type: The agent's output type (the envelope's ``result``).
        stack: The reliability stack around the agent.
        results: Where answered events' envelopes are kept.
        redelivery: Delays of naks and the number of deliveries.
        redact: Masks secrets in everything the handler writes.
        breakers: The stack's breakers, asked how long their circuits stay open.
        deadline_s: Per-event deadline.
        event_deadline: A tighter deadline of one event, in seconds (``None``: none).
        max_pause_s: Longest pause a failure may ask for.
        retry_redeliveries: Whether a redelivery may retry in-process too.
        clock: Time source for the stack and deadlines.
        stats: Where outcomes are counted (a new one when ``None``).
    """

    def __init__(
        self,
        *,
        name: str,
        decoder: Decoder[EventT],
        output_type: type[OutputT],
        stack: Stack[OutputT],
        results: ResultStore,
        redelivery: RedeliveryPolicy,
        redact: Callable[[str], str],
        breakers: Sequence[CircuitBreaker] = (),
        deadline_s: float | None = None,
        event_deadline: Callable[[EventT], float | None] | None = None,
        max_pause_s: float = 60.0,
        retry_redeliveries: bool = False,
        clock: Clock = SYSTEM_CLOCK,
        stats: ServiceStats | None = None,
    ) -> None:
        self.name = name
        self.decoder = decoder
        self.output_type = output_type
        self.envelope_type: type[ResultEnvelope[OutputT]] = ResultEnvelope[output_type]  # type: ignore[valid-type]
        self.stack = stack
        self.results = results
        self.redelivery = redelivery
        self.redact = redact
        self.breakers = tuple(breakers)
        self.deadline_s = deadline_s
        self.event_deadline = event_deadline
        self.max_pause_s = max_pause_s
        self.retry_redeliveries = retry_redeliveries
        self.clock = clock
        self.stats = stats or ServiceStats.for_this_process()
        self.dead_letters = DeadLetters(name, redact)
        self.masked = metrics.get_meter("stanchion").create_counter(
            "stanchion.secrets.masked", unit="{secret}", description="Known secrets masked before leaving the process."
        )

    def key(self, event_id: str) -> str:
        """The result store key of an event: scoped by the handler, so two handlers never share a result."""
        return f"{self.name}\x00{event_id}"

    async def handle(
        self,
        data: bytes,
        *,
        subject: str,
        headers: Mapping[str, str] | None = None,
        delivery: int = 1,
        retry: bool = True,
    ) -> Outcome:
        """Decode, answer, and say what to do with the message.

        Every log line written meanwhile carries ``handler``, ``subject`` (and ``event_id`` once known); the
        outcome is counted in ``stats``.

        Args:
            data: The payload as received.
            subject: Where it arrived.
            headers: Its headers.
            delivery: Its delivery count; a redelivery gets no in-process retries unless
                ``retry_redeliveries`` (the redelivery is the retry).
            retry: ``False`` turns in-process retries off for this call (e.g. when retrying after a pause).
        """
        started = self.clock.now()
        tokens = structlog.contextvars.bind_contextvars(handler=self.name, subject=subject, event_id=None)
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

    async def _handle(
        self,
        data: bytes,
        subject: str,
        headers: Mapping[str, str] | None,
        delivery: int,
        retry: bool,
        started: float,
    ) -> tuple[Outcome, Call | None]:
        event = self.decoder(data)
        if isinstance(event, Poison):
            return DeadLettered(self.poison(data, subject, delivery, event)), None
        event_id = self.decoder.event_id(event)
        structlog.contextvars.bind_contextvars(event_id=event_id)
        digest = content_digest(event)
        if (stored := await self.results.get(self.key(event_id))) is not None:
            if stored.digest and stored.digest != digest:
                return DeadLettered(self._conflict(data, subject, delivery, event_id, stored.digest, digest)), None
            log.info("already answered; no model call", delivery=delivery, published=stored.published)
            envelope = self.envelope_type.model_validate_json(stored.envelope)
            return (
                Answered(envelope, stored=True, published=stored.published, data=stored.envelope, digest=digest),
                None,
            )
        call = Call(
            event=event,
            subject=subject,
            headers=dict(headers or {}),
            clock=self.clock,
            timeout=self.deadline_s,
            delivery=delivery,
            may_retry=retry and (delivery == 1 or self.retry_redeliveries),
        )
        if self.event_deadline is not None and (seconds := self.event_deadline(event)) is not None:
            call.tighten_deadline(seconds)
        try:
            output = await self.stack(call)
        except (AllCandidatesFailed, NoCandidates) as exc:
            return await self._failed(exc, call, data, subject, delivery, event_id), call
        envelope = self.envelope_type(
            event_id=event_id,
            handler=self.name,
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
        text = body.decode()
        if self.redact(text) != text:
            # A known secret (or a key-shaped string) in the answer: mask it in the typed output, or refuse the answer.
            try:
                envelope = envelope.model_copy(update={"result": self._masked(output)})
            except ValidationError as exc:
                return self._secret_in_output(exc, call, data, subject, delivery, event_id), call
            body = envelope.model_dump_json().encode()
        await self.results.put(self.key(event_id), StoredResult(body, published=False, digest=digest))
        return Answered(envelope, data=body, digest=digest), call

    async def published(self, envelope: ResultEnvelope[Any], data: bytes = b"", digest: str = "") -> None:
        """Record that the output stream confirmed this result: a redelivery will only ack."""
        body = data or envelope.model_dump_json().encode()
        await self.results.put(self.key(envelope.event_id), StoredResult(body, published=True, digest=digest))

    def _masked(self, output: OutputT) -> OutputT:
        """``output`` with every known secret in its string fields masked, validated again as its type."""
        data = output.model_dump(mode="json")
        masked = _mask_strings(data, self.redact)
        self.masked.add(1, {"handler": self.name, "where": "output"})
        log.warning("a secret in the answer was masked", handler=self.name)
        return self.output_type.model_validate(masked)

    def _secret_in_output(
        self, exc: ValidationError, call: Call, data: bytes, subject: str, delivery: int, event_id: str
    ) -> Outcome:
        """The answer held a secret, and masked it is no longer valid: dead-lettered, never published."""
        problems = validation_problems(exc)
        return DeadLettered(
            self.dead_letter(
                data,
                subject=subject,
                error_type="secret_in_output",
                reason=f"the answer held a known secret, and masked it is not a valid {self.output_type.__name__}",
                event_id=event_id,
                delivery=delivery,
                models_tried=list(dict.fromkeys(call.models_tried)),
                attempts=call.attempts,
                errors=[problems],
                trace_id=call.trace_id,
                usage=call.usage,
                cost_usd=call.cost_usd,
            )
        )

    def _conflict(
        self, data: bytes, subject: str, delivery: int, event_id: str, answered: str, this: str
    ) -> DeadLetter:
        """An event whose id was answered for other content: never dropped silently, a dead letter naming both."""
        reason = (
            f"event id {event_id!r} was already answered for other content (sha256 {answered}); "
            f"this event's content is sha256 {this}"
        )
        log.warning("id reused with other content", error_type="conflict.id", answered=answered, this=this)
        return self.dead_letter(
            data, subject=subject, error_type="conflict.id", reason=reason, event_id=event_id, delivery=delivery
        )

    async def _all_circuits_open_for(self, candidates: list[str]) -> float | None:
        """When every candidate tried now has an open circuit: how long until the first may be tried again."""
        if not self.breakers or not candidates:
            return None
        waits: list[float] = []
        for name in set(candidates):
            # A candidate is closed to this event while any of its breakers rejects: until the last one reopens.
            rejecting = [w for b in self.breakers if (w := await b.rejecting_for(name)) is not None]
            if not rejecting:
                return None
            waits.append(max(rejecting))
        return min(min(waits), self.max_pause_s)

    def _redacted(self, decision: Decision) -> Decision:
        detail = self.redact(decision.detail)
        data = _redact_values(decision.data, self.redact)
        if detail == decision.detail and data is decision.data:
            return decision
        return decision.model_copy(update={"detail": detail, "data": data})

    def poison(self, data: bytes, subject: str, delivery: int, poison: Poison) -> DeadLetter:
        """The dead letter of a payload that is not a valid event (logged once)."""
        log.warning(
            "poison message",
            error_type=poison.error_type,
            reason=self.redact(poison.reason),
            subject=subject,
            event_id=poison.event_id,
        )
        return self.dead_letter(
            data,
            subject=subject,
            error_type=poison.error_type,
            reason=poison.reason,
            event_id=poison.event_id,
            delivery=delivery,
        )

    def dead_letter(self, data: bytes, *, trace_id: str | None = None, **fields: Any) -> DeadLetter:
        """A dead letter of this handler (see ``DeadLetters.build``), in the current trace when there is one."""
        return self.dead_letters.build(data, trace_id=trace_id or current_trace_id(), **fields)

    async def _failed(
        self, exc: Exception, call: Call, data: bytes, subject: str, delivery: int, event_id: str
    ) -> Outcome:
        causes = list(exc.exceptions) if isinstance(exc, AllCandidatesFailed) else [exc]
        transient = isinstance(exc, AllCandidatesFailed) and exc.transient
        if transient and not self.redelivery.last(delivery):
            # Pause only when every candidate said how long to wait (Retry-After, or an open circuit): one
            # candidate's open circuit beside another's one-off 500 is no reason to stop all work.
            waits = [wait_hint(cause) for cause in causes]
            hint = min(w for w in waits if w is not None) if waits and None not in waits else None
            if hint is None:
                hint = await self._all_circuits_open_for(call.models_tried)
            delay = self.redelivery.delay(delivery, hint)
            log.warning(
                "every candidate failed; redelivering later",
                event_id=event_id,
                delivery=delivery,
                delay_s=delay,
                pause_s=hint,
                error=self.redact(describe(exc)),
            )
            return Redeliver(delay, self.redact(describe(exc)), pause_s=hint, event_id=event_id)
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
                event_id=event_id,
                delivery=delivery,
                models_tried=list(dict.fromkeys(call.models_tried)),
                attempts=call.attempts,
                errors=[describe(c) for c in causes],
                trace_id=call.trace_id,
                usage=call.usage,
                cost_usd=call.cost_usd,
            )
        )


def _redact_values(value: Any, redact: Callable[[str], str]) -> Any:
    """``value`` with every string in it redacted; the same object when nothing changed."""
    if isinstance(value, str):
        masked = redact(value)
        return value if masked == value else masked
    if isinstance(value, dict):
        items = {k: _redact_values(v, redact) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    if isinstance(value, list | tuple):
        values = [_redact_values(v, redact) for v in value]
        return value if all(a is b for a, b in zip(values, value, strict=True)) else values
    return value
