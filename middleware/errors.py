"""The error taxonomy: which failures are worth retrying, which move on to the next candidate.

pydantic-ai raises one category class per kind of provider failure (``ModelRateLimitError``,
``ModelServerError``, ``ModelAuthenticationError``...). ``failure_kind`` maps those categories, and
the stack's own errors, onto the three reactions of ARCHITECTURE.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestRejectedError,
    ModelRequestTimeout,
    ModelServerError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)


class FailureKind(enum.Enum):
    """How the stack reacts to a failure."""

    TRANSIENT = "transient"
    """Worth retrying on the same candidate; counts toward its breaker."""
    PERMANENT = "permanent"
    """Retrying this candidate won't help; the next candidate may."""
    REJECTED = "rejected"
    """The stack itself refused to call (open circuit, deadline spent)."""


class StanchionError(Exception):
    """Base class of the errors the stack raises itself."""


class AttemptTimeout(StanchionError, TimeoutError):
    """One attempt took longer than its timeout. Transient."""

    def __init__(self, candidate: str | None, seconds: float) -> None:
        self.candidate = candidate
        self.seconds = seconds
        super().__init__(f"attempt on {candidate!r} timed out after {seconds:.3g}s")


class DeadlineExceeded(StanchionError, TimeoutError):
    """The event's overall deadline is spent; nothing more will be tried for it in this delivery."""

    def __init__(self, deadline_s: float | None) -> None:
        self.deadline_s = deadline_s
        super().__init__(
            "the event's deadline is spent"
            if deadline_s is None
            else f"the event's {deadline_s:.3g}s deadline is spent"
        )


class CircuitOpenError(StanchionError):
    """The breaker of ``candidate`` rejected the call without trying it.

    Attributes:
        candidate: The breaker's key.
        retry_in: Seconds until a probe may be let through (``None`` when forced open).
    """

    def __init__(self, candidate: str, retry_in: float | None, state: str = "open") -> None:
        self.candidate = candidate
        self.retry_in = retry_in
        self.state = state
        when = "until reset" if retry_in is None else f"for {max(retry_in, 0.0):.3g}s"
        super().__init__(f"circuit of {candidate!r} is {state}; rejecting calls {when}")


class InvalidOutput(StanchionError):
    """The candidate's output still failed the output schema after its output retries. Permanent for this event, and
    counted by the breaker of output quality (the candidate may answer other events validly).

    Attributes:
        candidate: The candidate that answered.
        errors: The last validation errors, ``{"field": ..., "message": ...}`` each (never the input).
        retries: The output retries it was given.
    """

    def __init__(self, candidate: str | None, errors: Sequence[Mapping[str, str]], retries: int | None = None) -> None:
        self.candidate = candidate
        self.errors = [dict(e) for e in errors]
        self.retries = retries
        after = "" if retries is None else f" after {retries} output retr{'y' if retries == 1 else 'ies'}"
        why = "; ".join(f"{e['field']}: {e['message']}" if e.get("field") else e["message"] for e in errors)
        super().__init__(f"output of {candidate!r} still invalid{after}: {why or 'no usable output'}")


class NoCandidates(StanchionError):
    """The route chose no model and allows no heuristic."""


class AllCandidatesFailed(ExceptionGroup[Exception]):
    """Every candidate failed and no heuristic answered. Keeps every cause, in the order tried.

    ``transient`` says whether trying again later may succeed (some cause was transient or rejected),
    which is what decides between a delayed redelivery and a dead letter.
    """

    def __new__(cls, message: str, exceptions: Sequence[Exception]) -> AllCandidatesFailed:
        return super().__new__(cls, message, exceptions)

    @property
    def transient(self) -> bool:
        return any(failure_kind(e) is not FailureKind.PERMANENT for e in self.exceptions)

    @property
    def retry_after(self) -> float | None:
        """The shortest wait any cause asked for (provider ``Retry-After`` or breaker reopening)."""
        waits = [w for e in self.exceptions if (w := wait_hint(e)) is not None]
        return min(waits) if waits else None


_TRANSIENT_STATUS = frozenset({408, 409, 425, 429})


def failure_kind(exc: BaseException) -> FailureKind:
    """Classify an exception raised below a middleware."""
    if isinstance(exc, CircuitOpenError | DeadlineExceeded | NoCandidates):
        return FailureKind.REJECTED
    if isinstance(exc, AllCandidatesFailed):
        return FailureKind.TRANSIENT if exc.transient else FailureKind.PERMANENT
    if isinstance(exc, InvalidOutput):
        return FailureKind.PERMANENT
    if isinstance(exc, AttemptTimeout | ModelRequestTimeout):
        return FailureKind.TRANSIENT
    if isinstance(exc, ModelQuotaExceededError | ModelRequestRejectedError):
        return FailureKind.PERMANENT
    if isinstance(exc, ModelRateLimitError | ModelUnavailableError | ModelServerError | ModelConnectionError):
        return FailureKind.TRANSIENT
    if isinstance(exc, ModelHTTPError):
        return (
            FailureKind.TRANSIENT
            if exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
            else FailureKind.PERMANENT
        )
    if isinstance(exc, ModelAPIError):
        # Uncategorised provider failure (e.g. an unreadable body): assume the provider hiccupped.
        return FailureKind.TRANSIENT
    if isinstance(exc, UnexpectedModelBehavior):
        # Includes output that still fails the schema after pydantic-ai's output retries.
        return FailureKind.PERMANENT
    if isinstance(exc, TimeoutError | ConnectionError):
        return FailureKind.TRANSIENT
    return FailureKind.PERMANENT


def is_transient(exc: BaseException) -> bool:
    """The default retry predicate: only transient failures are retried."""
    return failure_kind(exc) is FailureKind.TRANSIENT


def is_invalid_output(exc: BaseException) -> bool:
    """What the breaker of output quality counts: output still invalid after its retries."""
    return isinstance(exc, InvalidOutput)


def wait_hint(exc: BaseException) -> float | None:
    """Seconds the failure says to wait before trying again, if it says."""
    if isinstance(exc, ModelAPIError) and exc.retry_after is not None:
        return exc.retry_after
    if isinstance(exc, CircuitOpenError):
        return exc.retry_in
    return None


def describe(exc: BaseException) -> str:
    """One line naming the error type and its message, safe for logs and dead letters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:500]
