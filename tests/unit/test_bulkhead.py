"""Bulkhead: at most N calls at once per candidate; the others wait, within their event's deadline."""

from __future__ import annotations

import asyncio

import pytest

from stanchion.middleware import Bulkhead, Call, Candidate, DeadlineExceeded, Stack


class Gate:
    """A terminal that holds every call until released, counting how many are inside at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.release = asyncio.Event()

    async def __call__(self, call: Call) -> str:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.release.wait()
            return "ok"
        finally:
            self.inside -= 1


def call_to(name: str, timeout: float | None = None) -> Call:
    call = Call(event=None, timeout=timeout)
    call.candidate = Candidate(name)
    return call


async def test_calls_over_the_limit_wait_for_a_slot_and_say_how_long() -> None:
    gate, bulkhead = Gate(), Bulkhead({"local": 2})
    stack = Stack([bulkhead], gate)
    calls = [call_to("local") for _ in range(5)]
    tasks = [asyncio.create_task(stack(c)) for c in calls]
    await asyncio.sleep(0.05)
    assert gate.inside == 2 and bulkhead.in_use("local") == 2
    gate.release.set()
    assert await asyncio.gather(*tasks) == ["ok"] * 5
    assert gate.most == 2 and bulkhead.in_use("local") == 0
    waited = [c for c in calls if c.slot_wait_s > 0]
    assert len(waited) == 3
    assert all([d.kind for d in c.decisions] == ["bulkhead"] and d_limit(c) == 2 for c in waited)
    assert all(c.decisions == [] for c in calls if c not in waited)


def d_limit(call: Call) -> object:
    return call.decisions[0].data["limit"]


async def test_a_call_waiting_past_its_deadline_is_refused_as_deadline_spent_and_frees_nothing() -> None:
    gate, bulkhead = Gate(), Bulkhead({"local": 1})
    stack = Stack([bulkhead], gate)
    holder = asyncio.create_task(stack(call_to("local")))
    await asyncio.sleep(0.01)
    late = call_to("local", timeout=0.05)
    with pytest.raises(DeadlineExceeded):
        await stack(late)
    assert "deadline spent waiting" in late.decisions[-1].detail
    assert bulkhead.in_use("local") == 1
    gate.release.set()
    assert await holder == "ok"
    assert bulkhead.in_use("local") == 0


async def test_candidates_without_a_limit_pass_and_the_lowest_limit_set_wins() -> None:
    gate, bulkhead = Gate(), Bulkhead()
    bulkhead.limit("local", 3)
    bulkhead.limit("local", 1)
    bulkhead.limit("local", 2)
    assert bulkhead.limits == {"local": 1}
    stack = Stack([bulkhead], gate)
    free = [asyncio.create_task(stack(call_to("cloud"))) for _ in range(4)]
    await asyncio.sleep(0.02)
    assert gate.inside == 4
    gate.release.set()
    await asyncio.gather(*free)
    with pytest.raises(ValueError, match="at least 1"):
        bulkhead.limit("local", 0)
