"""structlog to stderr: JSON in production, readable console in development, secrets redacted.

Every line carries the current OpenTelemetry ``trace_id`` and ``span_id`` when there is a span, and what
the handler bound with ``structlog.contextvars`` (``event_id``, ``subject``). Secrets are masked twice: any
known secret value anywhere in a line, and the whole value of any field whose name says it is one.

Our own lines take structlog's native path (a level-filtering logger writing rendered lines to the stream);
the standard library's (FastStream, nats, OpenTelemetry) go through a handler on the root logger with the same
processors and renderer. Both write to the same stream, so the output is one stream of lines in one format.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from stanchion.handlers.runtime.redact import Redactor
from stanchion.middleware import AttemptRecord, Call

SECRET_FIELD = re.compile(
    r"(^|[_-])(api[_-]?key|private[_-]?key|token|password|passwd|secret|authorization|credentials?|creds)$",
    re.IGNORECASE,
)

llm_log = structlog.get_logger("stanchion.llm")


def add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``trace_id`` and ``span_id`` of the current span, when there is a real one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def redactor_processor(redact: Redactor) -> Any:
    """A structlog processor masking secret-named fields and every known secret in any string field."""
    secret_named: dict[str, bool] = {}  # field names come from code: a small set, each matched once

    def is_secret_name(key: str) -> bool:
        named = secret_named.get(key)
        if named is None:
            named = SECRET_FIELD.search(key) is not None
            if len(secret_named) < 4096:
                secret_named[key] = named
        return named

    def redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if value is None or key in ("trace_id", "span_id"):
                continue
            if is_secret_name(key):
                event[key] = "***"
            elif isinstance(value, str):
                event[key] = redact(value)
            elif not isinstance(value, int | float | bool):
                text = str(value)
                redacted = redact(text)
                if redacted != text:
                    event[key] = redacted
        return event

    return redact_event


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def escape_controls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Control characters in string fields as escapes (``\\x00``): a console line must not carry raw NULs or
    terminal escape sequences from an event. (JSON lines escape them already.)"""
    for key, value in event.items():
        if isinstance(value, str) and _CONTROL.search(value) is not None:
            event[key] = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], value)
    return event


class LlmCallLog:
    """One ``llm_call_completed`` line per model call (an ``AttemptRecorder``)."""

    def attempt_finished(self, call: Call, record: AttemptRecord) -> None:
        llm_log.info(
            "llm_call_completed",
            candidate=record.candidate,
            model=record.model,
            route=record.route,
            attempt=record.attempt,
            delivery=record.delivery,
            outcome=record.outcome,
            latency_ms=round(record.latency_s * 1000, 3),
            input_tokens=record.usage.input_tokens,
            output_tokens=record.usage.output_tokens,
            requests=record.usage.requests,
            cost_usd=record.cost_usd,
            error=record.error,
        )


class QuietPullTimeouts(logging.Filter):
    """Drops FastStream's "Task-N raised an exception, retrying..." when the exception is a pull's timeout.

    FastStream 0.7.8 suppresses ``nats.errors.TimeoutError`` around a pull subscriber's ``fetch``, but nats-py 2.16
    raises ``asyncio.TimeoutError`` there when no message came: an empty pull, not a failure. The supervisor then
    logs it at error level with a traceback (once per process) and restarts the task, as it should.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, TimeoutError) and "raised an exception, retrying" in str(record.msg))


def configure_logging(
    level: str = "info", fmt: str = "console", secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library (FastStream, nats) through one redacting renderer.

    Args:
        level: Lowest level written.
        fmt: ``json`` or ``console``.
        secrets: Values masked wherever they appear.
        stream: Where lines go (default: standard error).
    """
    stream = stream or sys.stderr
    redact_event = redactor_processor(Redactor(secrets))
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    console_only: list[Any] = [] if fmt == "json" else [escape_controls]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        structlog.processors.format_exc_info,
        redact_event,
        *console_only,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=structlog.WriteLoggerFactory(stream),
        # Levels below `level` are no-ops; no LogRecord, handler or formatter per line.
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # Not cached: module-level loggers must follow a later configure_logging (tests, `stanchion demo`).
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(QuietPullTimeouts())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "anthropic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
