"""The stack of one handler, built from its policy: Tracing → Route → Fallback → Retry → CircuitBreaker →
Observe → Timeout → the terminal (see ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from opentelemetry import trace
from tenacity import stop_after_attempt, wait_exponential_jitter

from stanchion.handlers.policy import BreakerConfig, ResolvedPolicy
from stanchion.middleware import (
    SYSTEM_CLOCK,
    AttemptRecorder,
    BreakerPolicy,
    BreakerStore,
    Bulkhead,
    Call,
    Candidate,
    CircuitBreaker,
    Clock,
    Fallback,
    InMemoryBreakerStore,
    Middleware,
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
    is_invalid_output,
    is_transient,
)

OutputT = TypeVar("OutputT")

log = structlog.get_logger("stanchion.service")


def breaker_policy(config: BreakerConfig, *, quality: bool = False) -> BreakerPolicy:
    """The middleware's policy of a configured breaker (``quality``: the breaker of output quality)."""
    return BreakerPolicy(
        counts=(is_invalid_output if config.count_invalid_output else _never) if quality else is_transient,
        consecutive_failures=config.consecutive_failures,
        failure_rate=config.failure_rate,
        window=config.window,
        min_calls=config.min_calls,
        open_for=config.open_s,
        half_open_probes=config.half_open_probes,
        probe_lease=config.probe_lease_s,
    )


def _never(exc: BaseException) -> bool:
    return False


def build_stack(
    policy: ResolvedPolicy,
    terminal: Terminal[OutputT],
    candidates: Mapping[str, Candidate],
    *,
    rules: Sequence[Rule] = (),
    heuristic: Callable[[Call], Awaitable[OutputT]] | None = None,
    attempt_timeout_s: float = 20.0,
    tracing: bool = False,
    clock: Clock = SYSTEM_CLOCK,
    breaker_store: BreakerStore | None = None,
    redact: Callable[[str], str] = str,
    recorders: Sequence[AttemptRecorder] = (),
    on_transition: Sequence[Callable[[str, Any, Any], None]] = (),
    handler: str = "handler",
    bulkhead: Bulkhead | None = None,
) -> tuple[Stack[OutputT], tuple[CircuitBreaker, CircuitBreaker]]:
    """The stack and its two breakers: provider health (transient failures, keyed by model, in ``breaker_store``
    shared by every handler using it) and output quality (invalid output, keyed ``<handler>/<model>``).

    Args:
        policy: The handler's resolved policy (routes, retry, timeouts, breaker).
        terminal: The innermost step (e.g. ``AgentTerminal``).
        candidates: The policy's models as candidates, by name.
        rules: Routing rules, in order.
        heuristic: The answer of last resort (``None``: no degraded answers, whatever the routes say).
        attempt_timeout_s: Per-attempt timeout where the route sets none.
        tracing: Add the Tracing middleware and attempt spans (when an exporter is configured).
        recorders: Told about every model call.
        on_transition: Told about every breaker state change (besides its log line).
        handler: The handler's name: the scope of its breaker of output quality.
        bulkhead: The per-model concurrency limits, shared by every stack of the process (``None``: this
            stack's own); the policy's ``max_concurrency`` values are set on it.
    """
    routes = {
        name: RouteSpec(tuple(candidates[m] for m in route.models), route.heuristic and heuristic is not None)
        for name, route in policy.routes.items()
    }
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
    timeouts = {name: route.timeout.attempt_s or attempt_timeout_s for name, route in policy.routes.items()}
    store = breaker_store or InMemoryBreakerStore()
    if not isinstance(store, InMemoryBreakerStore):  # shared: a stale lease lets another replica probe too
        _check_leases(policy, max(timeouts.values(), default=attempt_timeout_s))
    breakers = tuple(
        CircuitBreaker(
            policy=breaker_policy(policy.breaker, quality=quality),
            per_candidate={
                m.name: breaker_policy(m.breaker, quality=quality) for m in policy.models if m.breaker is not None
            },
            store=store,
            clock=clock,
            on_transition=[_log_transition, *on_transition],
            scope=handler if quality else "",
            label="output quality" if quality else "",
        )
        for quality in (False, True)
    )
    health, quality = breakers
    bulkhead = bulkhead if bulkhead is not None else Bulkhead()
    for model in policy.models:
        if model.max_concurrency is not None:
            bulkhead.limit(model.name, model.max_concurrency)
    model_names = {m.name: m.model for m in policy.models}
    middleware: list[Middleware[OutputT]] = [
        # Tracing only when an exporter is configured: without one its spans would be no-ops anyway.
        *([Tracing(redact=redact, annotate_current=True)] if tracing else []),
        Route(routes, rules, policy.default_route),
        Fallback(heuristic),
        Retry(per_route=retry),
        health,
        quality,
        *([bulkhead] if bulkhead.limits else []),
        Observe(
            recorders=recorders,
            tracer=trace.get_tracer("stanchion") if tracing else None,
            model_of=lambda candidate: model_names.get(candidate.name, candidate.name),
            redact=redact,
        ),
        Timeout(attempt_timeout_s, per_route=timeouts),
    ]
    return Stack(middleware, terminal), (health, quality)


def _check_leases(policy: ResolvedPolicy, attempt_timeout_s: float) -> None:
    """Warn when a half-open probe could outlive its lease: another probe would then be let through beside it."""
    for model in policy.models:
        lease = breaker_policy(model.breaker or policy.breaker).lease
        if lease < attempt_timeout_s:
            log.warning(
                "a half-open probe may outlive its lease: set breaker.probe_lease_s (or open_s) above the attempt "
                "timeout",
                candidate=model.name,
                lease_s=lease,
                attempt_timeout_s=attempt_timeout_s,
            )


def _log_transition(key: str, old: Any, new: Any) -> None:
    log.warning("circuit breaker changed state", candidate=key, old=old.value, new=new.value)
