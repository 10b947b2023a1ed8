"""Fallback: candidates in order, then the heuristic, otherwise one error that keeps every cause."""

from __future__ import annotations

import pytest

from stanchion.middleware import (
    AllCandidatesFailed,
    Call,
    Candidate,
    CircuitOpenError,
    DeadlineExceeded,
    FakeClock,
    Fallback,
    NoCandidates,
)
from tests.unit.fakes import Script, not_found, rate_limited, server_error, unauthorized


def make_call(
    *names: str, clock: FakeClock | None = None, timeout: float | None = None, heuristic: bool = True
) -> Call:
    call = Call(event=None, clock=clock or FakeClock(), timeout=timeout)
    call.candidates = tuple(Candidate(name) for name in names)
    call.allow_heuristic = heuristic
    return call


async def rules(call: Call) -> str:
    return "from rules"


async def test_first_candidate_that_answers_serves() -> None:
    """Candidates are tried in order until one answers; later ones are never called."""
    script = Script({"a": [server_error()], "b": ["from b"], "c": ["from c"]})
    call = make_call("a", "b", "c")

    assert await Fallback[str]()(call, script) == "from b"
    assert script.calls == ["a", "b"]
    assert call.served_by == "b"
    assert call.models_tried == ["a", "b"]
    assert call.candidate == Candidate("b")
    assert not call.degraded


@pytest.mark.parametrize(
    "error",
    [unauthorized(), not_found(), CircuitOpenError("a", 12.0), rate_limited(), ValueError("bug")],
    ids=["401", "404", "circuit open", "429 after retries", "programming error"],
)
async def test_any_failure_moves_on_to_the_next_candidate(error: Exception) -> None:
    """Whatever failure reaches Fallback, permanent, rejected or transient, the next candidate is tried."""
    script = Script({"a": [error], "b": ["from b"]})

    assert await Fallback[str]()(make_call("a", "b"), script) == "from b"


async def test_each_failed_candidate_is_recorded_as_a_decision() -> None:
    """A ``fallback`` decision names each failed candidate, its error and the failure kind."""
    script = Script({"a": [unauthorized()], "b": [CircuitOpenError("b", 3.0)], "c": ["ok"]})
    call = make_call("a", "b", "c")

    await Fallback[str]()(call, script)

    assert [(d.kind, d.model, d.data) for d in call.decisions] == [
        ("fallback", "a", {"failure": "permanent"}),
        ("fallback", "b", {"failure": "rejected"}),
    ]
    assert call.decisions[0].detail.startswith("ModelAuthenticationError: status_code: 401")


async def test_heuristic_answers_when_every_candidate_fails() -> None:
    """With the heuristic allowed it answers last, and the call is marked degraded."""
    script = Script({"a": [server_error()], "b": [unauthorized()]})
    call = make_call("a", "b")

    assert await Fallback(heuristic=rules, heuristic_name="rules")(call, script) == "from rules"
    assert script.calls == ["a", "b"]
    assert (call.served_by, call.degraded, call.candidate) == ("rules", True, None)
    assert call.decisions[-1].kind == "degraded"
    assert call.decisions[-1].model == "rules"
    assert call.decisions[-1].detail == "2 candidate(s) failed; the heuristic answers"


async def test_heuristic_alone_answers_a_route_without_candidates() -> None:
    """A route with no candidates but a heuristic is answered by the heuristic."""
    call = make_call()

    assert await Fallback(heuristic=rules)(call, Script({})) == "from rules"
    assert (call.served_by, call.degraded) == ("heuristic", True)


async def test_route_without_heuristic_raises_all_candidates_failed() -> None:
    """When the route forbids the heuristic, the failures are raised even though one is configured."""
    script = Script({"a": [server_error()]})

    with pytest.raises(AllCandidatesFailed):
        await Fallback(heuristic=rules)(make_call("a", heuristic=False), script)


async def test_all_candidates_failed_keeps_every_cause_in_order() -> None:
    """The group holds each candidate's own error, in the order the candidates were tried."""
    errors = [server_error(), unauthorized(), CircuitOpenError("c", 4.0)]
    script = Script({"a": [errors[0]], "b": [errors[1]], "c": [errors[2]]})
    call = make_call("a", "b", "c")

    with pytest.raises(AllCandidatesFailed) as raised:
        await Fallback[str]()(call, script)
    assert list(raised.value.exceptions) == errors
    assert all(got is want for got, want in zip(raised.value.exceptions, errors, strict=True))
    assert raised.value.message == "all 3 candidate(s) of route 'default' failed"
    assert call.candidate is None
    assert call.served_by is None


@pytest.mark.parametrize(
    ("errors", "transient"),
    [
        ([unauthorized(), not_found()], False),
        ([unauthorized(), server_error()], True),
        ([unauthorized(), CircuitOpenError("b", None, "forced_open")], True),
        ([ValueError("bug")], False),
    ],
    ids=["all permanent", "one transient", "one rejected", "one bug"],
)
async def test_transient_says_whether_trying_later_may_help(errors: list[Exception], transient: bool) -> None:
    """``transient`` is false only when every cause is permanent."""
    names = [f"c{i}" for i in range(len(errors))]
    script = Script({name: [error] for name, error in zip(names, errors, strict=True)})

    with pytest.raises(AllCandidatesFailed) as raised:
        await Fallback[str]()(make_call(*names), script)
    assert raised.value.transient is transient


async def test_retry_after_is_the_shortest_hint() -> None:
    """``retry_after`` is the smallest wait any cause asked for, provider or breaker."""
    script = Script({"a": [rate_limited(retry_after=7.0)], "b": [CircuitOpenError("b", 3.0)], "c": [unauthorized()]})

    with pytest.raises(AllCandidatesFailed) as raised:
        await Fallback[str]()(make_call("a", "b", "c"), script)
    assert raised.value.retry_after == 3.0


async def test_retry_after_is_none_without_hints() -> None:
    """When no cause says how long to wait, ``retry_after`` is ``None``."""
    script = Script({"a": [server_error()], "b": [CircuitOpenError("b", None, "forced_open")]})

    with pytest.raises(AllCandidatesFailed) as raised:
        await Fallback[str]()(make_call("a", "b"), script)
    assert raised.value.retry_after is None


async def test_no_candidates_and_no_heuristic_raises_no_candidates() -> None:
    """With nothing to try and no heuristic, ``NoCandidates`` names the route."""
    call = make_call(heuristic=True)
    call.route = "empty"

    with pytest.raises(NoCandidates, match="'empty'"):
        await Fallback[str]()(call, Script({}))
    with pytest.raises(NoCandidates):
        await Fallback(heuristic=rules)(make_call(heuristic=False), Script({}))


async def test_spent_deadline_skips_the_remaining_candidates() -> None:
    """Once the event's deadline is spent no further candidate is called, and the group says why."""
    clock = FakeClock()
    slow_failure = server_error()
    calls: list[str] = []

    async def terminal(call: Call) -> str:
        assert call.candidate is not None
        calls.append(call.candidate.name)
        clock.advance(6.0)
        raise slow_failure

    call = make_call("a", "b", "c", clock=clock, timeout=5.0)

    with pytest.raises(AllCandidatesFailed) as raised:
        await Fallback[str]()(call, terminal)
    assert calls == ["a"]
    first, second = raised.value.exceptions
    assert first is slow_failure
    assert isinstance(second, DeadlineExceeded)
    assert second.deadline_s == 5.0
    assert raised.value.transient
    assert call.models_tried == ["a"]
    assert call.decisions[-1].kind == "fallback"
    assert call.decisions[-1].model == "b"
    assert "deadline spent" in call.decisions[-1].detail


async def test_spent_deadline_still_lets_the_heuristic_answer() -> None:
    """The heuristic costs no model call, so it answers even when the deadline is spent."""
    clock = FakeClock()
    call = make_call("a", clock=clock, timeout=5.0)
    clock.advance(5.0)
    script = Script({"a": ["never"]})

    assert await Fallback(heuristic=rules)(call, script) == "from rules"
    assert script.calls == []
    assert call.degraded
