"""The error taxonomy: ``failure_kind`` sorts every failure into transient, permanent or rejected."""

from __future__ import annotations

import pytest
from pydantic_ai.exceptions import (
    ContentFilterError,
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    ModelOverloadedError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestRejectedError,
    ModelRequestTimeout,
    ModelServerError,
    ModelTimeoutError,
    ModelUnavailableError,
    UnexpectedModelBehavior,
)

from stanchion.middleware import (
    AllCandidatesFailed,
    AttemptTimeout,
    CircuitOpenError,
    DeadlineExceeded,
    FailureKind,
    NoCandidates,
    StanchionError,
    describe,
    failure_kind,
    is_transient,
    wait_hint,
)
from tests.unit.fakes import context_window, not_found, rate_limited, server_error, unauthorized

TRANSIENT, PERMANENT, REJECTED = FailureKind.TRANSIENT, FailureKind.PERMANENT, FailureKind.REJECTED

TABLE: dict[str, tuple[BaseException, FailureKind]] = {
    # pydantic-ai categories, as its models raise them for an HTTP status
    "429 rate limit": (rate_limited(), TRANSIENT),
    "503 unavailable": (ModelHTTPError.for_category(ModelUnavailableError, status_code=503, model_name="m"), TRANSIENT),
    "529 overloaded": (ModelHTTPError.for_category(ModelOverloadedError, status_code=529, model_name="m"), TRANSIENT),
    "500 server error": (server_error(500), TRANSIENT),
    "402 quota": (ModelHTTPError.for_category(ModelQuotaExceededError, status_code=402, model_name="m"), PERMANENT),
    "429 quota": (ModelHTTPError.for_category(ModelQuotaExceededError, status_code=429, model_name="m"), PERMANENT),
    "422 rejected": (
        ModelHTTPError.for_category(ModelRequestRejectedError, status_code=422, model_name="m"),
        PERMANENT,
    ),
    "400 context window": (context_window(), PERMANENT),
    "401 auth": (unauthorized(), PERMANENT),
    "404 not found": (not_found(), PERMANENT),
    # the same categories without a status
    "rate limit, no status": (ModelRateLimitError("m", "slow down"), TRANSIENT),
    "server error, no status": (ModelServerError("m", "oops"), TRANSIENT),
    "quota, no status": (ModelQuotaExceededError("m", "no credits"), PERMANENT),
    "connection": (ModelConnectionError("m", "connection refused", phase="connect"), TRANSIENT),
    "transport timeout": (ModelTimeoutError("m", "read timed out"), TRANSIENT),
    "request timeout": (ModelRequestTimeout("m", 10.0), TRANSIENT),
    "uncategorised api error": (ModelAPIError("m", "unreadable body"), TRANSIENT),
    # plain HTTP errors, by status
    "plain 408": (ModelHTTPError(408, "m"), TRANSIENT),
    "plain 409": (ModelHTTPError(409, "m"), TRANSIENT),
    "plain 425": (ModelHTTPError(425, "m"), TRANSIENT),
    "plain 429": (ModelHTTPError(429, "m"), TRANSIENT),
    "plain 502": (ModelHTTPError(502, "m"), TRANSIENT),
    "plain 400": (ModelHTTPError(400, "m"), PERMANENT),
    "plain 403": (ModelHTTPError(403, "m"), PERMANENT),
    "plain 404": (ModelHTTPError(404, "m"), PERMANENT),
    # the model misbehaved
    "unexpected behaviour": (UnexpectedModelBehavior("output failed validation"), PERMANENT),
    "content filter": (ContentFilterError("filtered"), PERMANENT),
    # the stack's own errors
    "attempt timeout": (AttemptTimeout("a", 1.0), TRANSIENT),
    "deadline exceeded": (DeadlineExceeded(5.0), REJECTED),
    "circuit open": (CircuitOpenError("a", 3.0), REJECTED),
    "no candidates": (NoCandidates("none"), REJECTED),
    # anything else
    "builtin timeout": (TimeoutError("socket"), TRANSIENT),
    "connection reset": (ConnectionResetError("reset"), TRANSIENT),
    "programming error": (KeyError("bug"), PERMANENT),
}


@pytest.mark.parametrize(("exc", "kind"), TABLE.values(), ids=TABLE.keys())
def test_failure_kind_table(exc: BaseException, kind: FailureKind) -> None:
    """Each failure gets the reaction the table gives it, and only transient ones are retryable."""
    assert failure_kind(exc) is kind
    assert is_transient(exc) is (kind is TRANSIENT)


def test_all_candidates_failed_is_transient_when_any_cause_may_pass() -> None:
    """A group with a transient or rejected cause is transient; one of only permanent causes is permanent."""
    assert failure_kind(AllCandidatesFailed("x", [unauthorized(), server_error()])) is TRANSIENT
    assert failure_kind(AllCandidatesFailed("x", [unauthorized(), CircuitOpenError("b", None)])) is TRANSIENT
    assert failure_kind(AllCandidatesFailed("x", [unauthorized(), not_found()])) is PERMANENT


def test_all_candidates_failed_nests() -> None:
    """A group inside a group is judged by its own causes."""
    inner = AllCandidatesFailed("inner", [unauthorized()])
    assert AllCandidatesFailed("outer", [inner, not_found()]).transient is False
    assert AllCandidatesFailed("outer", [inner, rate_limited()]).transient is True


def test_stack_errors_are_typed() -> None:
    """The stack's own errors share a base class, and its timeouts are also ``TimeoutError``."""
    assert isinstance(AttemptTimeout("a", 1.0), StanchionError)
    assert isinstance(AttemptTimeout("a", 1.0), TimeoutError)
    assert isinstance(DeadlineExceeded(None), TimeoutError)
    assert isinstance(CircuitOpenError("a", 1.0), StanchionError)
    assert isinstance(NoCandidates("none"), StanchionError)
    assert isinstance(AllCandidatesFailed("x", [ValueError()]), ExceptionGroup)


@pytest.mark.parametrize(
    ("exc", "hint"),
    [
        (rate_limited(retry_after=2.5), 2.5),
        (rate_limited(retry_after=0.0), 0.0),
        (ModelHTTPError(503, "m", headers={"retry-after-ms": "1500"}), 1.5),
        (ModelServerError("m", "oops", retry_after=4.0), 4.0),
        (CircuitOpenError("a", 12.0), 12.0),
        (rate_limited(), None),
        (CircuitOpenError("a", None, "forced_open"), None),
        (TimeoutError(), None),
    ],
    ids=["retry_after", "zero", "retry-after-ms header", "no status", "circuit", "no hint", "forced open", "other"],
)
def test_wait_hint(exc: BaseException, hint: float | None) -> None:
    """``wait_hint`` reads the provider's ``retry_after`` or the breaker's ``retry_in``, else ``None``."""
    assert wait_hint(exc) == hint


def test_stack_error_messages() -> None:
    """The stack's errors say what happened and when to try again, in one line."""
    assert str(AttemptTimeout("fast", 2.0)) == "attempt on 'fast' timed out after 2s"
    assert str(DeadlineExceeded(5.0)) == "the event's 5s deadline is spent"
    assert str(DeadlineExceeded(None)) == "the event's deadline is spent"
    assert str(CircuitOpenError("fast", 12.5)) == "circuit of 'fast' is open; rejecting calls for 12.5s"
    assert (
        str(CircuitOpenError("fast", None, "forced_open"))
        == "circuit of 'fast' is forced_open; rejecting calls until reset"
    )


def test_describe_names_the_type_and_message() -> None:
    """``describe`` is the error's type name and its message."""
    assert describe(ValueError("bad input")) == "ValueError: bad input"
    assert describe(CircuitOpenError("a", 1.0)) == "CircuitOpenError: circuit of 'a' is open; rejecting calls for 1s"


def test_describe_names_pydantic_ai_errors_by_category() -> None:
    """An HTTP error is described by its category, with its status."""
    assert describe(rate_limited()) == "ModelRateLimitError: status_code: 429, model_name: m, body: None"


def test_describe_keeps_only_the_first_line() -> None:
    """A multi-line message, like a response body, is cut to its first line."""
    text = describe(UnexpectedModelBehavior("bad output", body='{"error": {"detail": "x"}}'))

    assert text == "UnexpectedModelBehavior: bad output, body:"
    assert "\n" not in describe(ValueError("one\ntwo\nthree"))


def test_describe_is_bounded() -> None:
    """A huge message is truncated to 500 characters."""
    assert len(describe(ValueError("x" * 10_000))) == 500


def test_describe_an_error_without_message() -> None:
    """An error with no message is still described by its type."""
    assert describe(ValueError()).startswith("ValueError:")
