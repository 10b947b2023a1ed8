"""Fakes shared by the unit tests: provider errors as pydantic-ai raises them, and a scripted terminal step."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from pydantic_ai.exceptions import (
    ModelAuthenticationError,
    ModelContextWindowExceededError,
    ModelHTTPError,
    ModelNotFoundError,
    ModelRateLimitError,
    ModelServerError,
)

from stanchion.middleware import Call

Outcome = str | Exception
"""What one scripted attempt does: answer this text, or raise this error."""


def rate_limited(retry_after: float | None = None) -> ModelHTTPError:
    """A 429 as pydantic-ai raises it, optionally asking to wait ``retry_after`` seconds."""
    return ModelHTTPError.for_category(ModelRateLimitError, status_code=429, model_name="m", retry_after=retry_after)


def server_error(status: int = 503) -> ModelHTTPError:
    """A 5xx as pydantic-ai raises it."""
    return ModelHTTPError.for_category(ModelServerError, status_code=status, model_name="m")


def unauthorized() -> ModelHTTPError:
    """A 401: the credentials are wrong, retrying won't help."""
    return ModelHTTPError.for_category(ModelAuthenticationError, status_code=401, model_name="m")


def not_found() -> ModelHTTPError:
    """A 404: the model does not exist."""
    return ModelHTTPError.for_category(ModelNotFoundError, status_code=404, model_name="m")


def context_window() -> ModelHTTPError:
    """A 400 because the prompt is too long for the model."""
    return ModelHTTPError.for_category(ModelContextWindowExceededError, status_code=400, model_name="m")


class Script:
    """A terminal step that plays a script of outcomes per candidate; the last outcome repeats forever.

    Every call is recorded in ``calls`` (the candidate's name, ``"default"`` without one).
    """

    def __init__(self, outcomes: Mapping[str, Sequence[Outcome]]) -> None:
        self._outcomes = {name: list(seq) for name, seq in outcomes.items()}
        self.calls: list[str] = []

    async def __call__(self, call: Call) -> str:
        name = call.candidate.name if call.candidate else "default"
        self.calls.append(name)
        queue = self._outcomes[name]
        outcome = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def count(self, name: str) -> int:
        """How many times ``name`` was called."""
        return self.calls.count(name)


class Countdown:
    """Fires once ``count`` concurrent tasks have checked in: lets a test wait until all of them got somewhere."""

    def __init__(self, count: int) -> None:
        self._left = count
        self._done = asyncio.Event()

    def check_in(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()
