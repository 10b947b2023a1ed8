"""Stack: list order is execution order, outermost first; any ``async (call, call_next)`` is a middleware."""

from __future__ import annotations

import pytest

from stanchion.middleware import Call, Middleware, Next, Stack


def recorder(name: str, record: list[str]) -> Middleware[str]:
    """A plain async function middleware that records entering and leaving."""

    async def middleware(call: Call, call_next: Next[str]) -> str:
        record.append(name)
        result = await call_next(call)
        record.append(f"{name} done")
        return result

    return middleware


class Tagger:
    """A middleware object that tags the result on its way out."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def __call__(self, call: Call, call_next: Next[str]) -> str:
        return f"{await call_next(call)}+{self.tag}"


async def test_first_middleware_listed_runs_outermost() -> None:
    """Middleware run in list order on the way in and in reverse on the way out, around the terminal."""
    record: list[str] = []

    async def terminal(call: Call) -> str:
        record.append("terminal")
        return "answer"

    stack = Stack([recorder("outer", record), recorder("middle", record), recorder("inner", record)], terminal)

    assert await stack(Call(event=None)) == "answer"
    assert record == ["outer", "middle", "inner", "terminal", "inner done", "middle done", "outer done"]


async def test_plain_functions_and_objects_mix_in_one_stack() -> None:
    """Plain async functions and middleware objects are accepted side by side."""
    record: list[str] = []

    async def terminal(call: Call) -> str:
        return "answer"

    stack = Stack([Tagger("outer"), recorder("fn", record), Tagger("inner")], terminal)

    assert await stack(Call(event=None)) == "answer+inner+outer"
    assert record == ["fn", "fn done"]


async def test_empty_stack_calls_the_terminal() -> None:
    """With no middleware the stack is just its terminal."""

    async def terminal(call: Call) -> str:
        return f"terminal saw {call.subject}"

    assert await Stack([], terminal)(Call(event=None, subject="tasks.classify")) == "terminal saw tasks.classify"


async def test_middleware_may_short_circuit() -> None:
    """A middleware that does not call ``call_next`` answers alone; nothing below it runs."""
    record: list[str] = []

    async def cached(call: Call, call_next: Next[str]) -> str:
        record.append("cached")
        return "from cache"

    async def terminal(call: Call) -> str:
        record.append("terminal")
        return "answer"

    stack = Stack([recorder("outer", record), cached, recorder("inner", record)], terminal)

    assert await stack(Call(event=None)) == "from cache"
    assert record == ["outer", "cached", "outer done"]


async def test_middleware_may_call_next_several_times() -> None:
    """``call_next`` runs the whole rest of the stack again on every call."""
    record: list[str] = []
    answers = iter(["a", "b", "c"])

    async def thrice(call: Call, call_next: Next[str]) -> str:
        return ",".join([await call_next(call) for _ in range(3)])

    async def terminal(call: Call) -> str:
        record.append("terminal")
        return next(answers)

    stack = Stack([thrice, recorder("inner", record)], terminal)

    assert await stack(Call(event=None)) == "a,b,c"
    assert record == ["inner", "terminal", "inner done"] * 3


async def test_middleware_changes_to_the_call_are_seen_below() -> None:
    """The same ``Call`` flows down, so what an outer middleware sets the terminal can read."""

    async def set_route(call: Call, call_next: Next[str]) -> str:
        call.route = "strong"
        return await call_next(call)

    async def terminal(call: Call) -> str:
        return call.route

    assert await Stack([set_route], terminal)(Call(event=None)) == "strong"


async def test_errors_propagate_through_every_layer() -> None:
    """An error from the terminal reaches the caller, passing out through each middleware."""
    record: list[str] = []

    async def guard(call: Call, call_next: Next[str]) -> str:
        try:
            return await call_next(call)
        finally:
            record.append("guard unwound")

    async def terminal(call: Call) -> str:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await Stack([guard], terminal)(Call(event=None))
    assert record == ["guard unwound"]


async def test_a_stack_serves_many_calls_without_sharing_state() -> None:
    """One stack built once handles successive calls, each with its own ``Call``."""

    async def terminal(call: Call) -> str:
        return str(call.event)

    stack = Stack([Tagger("t")], terminal)

    assert [await stack(Call(event=n)) for n in range(3)] == ["0+t", "1+t", "2+t"]
