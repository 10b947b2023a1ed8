"""The ``Middleware`` contract and ``Stack``: list order is execution order, outermost first."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Generic, Protocol, TypeVar

from stanchion.middleware.call import Call

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

Next = Callable[[Call], Awaitable[R]]
"""The rest of the stack below a middleware: call it zero, one or many times."""

Terminal = Callable[[Call], Awaitable[R]]
"""The innermost step, e.g. running the agent with ``call.candidate``."""


class Middleware(Protocol[R]):
    """``async (call, call_next) -> result``. A plain async function with that shape is a middleware."""

    def __call__(self, call: Call, call_next: Next[R], /) -> Awaitable[R]: ...


class Stack(Generic[R]):
    """Middleware around a terminal step; the first middleware in the list runs outermost.

    Args:
        middleware: Outermost first.
        terminal: The innermost step.
    """

    def __init__(self, middleware: Sequence[Middleware[R]], terminal: Terminal[R]) -> None:
        self.middleware = tuple(middleware)
        self.terminal = terminal
        handler: Next[R] = terminal
        # Wrap from the inside out so that middleware[0] ends up outermost.
        for mw in reversed(self.middleware):
            handler = partial(_invoke, mw, handler)
        self._handler = handler

    async def __call__(self, call: Call) -> R:
        return await self._handler(call)


async def _invoke(mw: Middleware[R], call_next: Next[R], call: Call) -> R:
    return await mw(call, call_next)
