"""Route: picks the ordered candidates (and whether a heuristic may answer) for each event."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stanchion.middleware.call import Call, Candidate
from stanchion.middleware.stack import Next

R = TypeVar("R")


@dataclass(frozen=True)
class RouteSpec:
    """One route: candidates in the order to try them, and whether the heuristic may answer last."""

    candidates: tuple[Candidate, ...]
    heuristic: bool = True


@dataclass(frozen=True)
class Rule:
    """Sends an event to ``route`` when the predicate ``when`` holds for it.

    Args:
        route: Route name.
        when: A predicate on the event. It may return a string instead of ``True``: the reason, in words, that
            the route decision records (e.g. ``"kind is complex"``).
        name: What the route decision says matched otherwise (default: the predicate's ``__name__``).
    """

    route: str
    when: Callable[[Any], bool | str | None]
    name: str = ""

    def matches(self, event: Any) -> bool:
        return self.why(event) is not None

    def why(self, event: Any) -> str | None:
        """Which predicate sends ``event`` to this rule's route; ``None`` when it does not hold."""
        held = self.when(event)
        if not held:
            return None
        if isinstance(held, str):
            return held
        return f"{self.name or getattr(self.when, '__name__', 'predicate')} matched"


@dataclass(frozen=True)
class Route:
    """The first matching rule names the route; otherwise ``default``.

    Args:
        routes: Route name to its spec.
        rules: Checked in order.
        default: Route for events no rule matches.
    """

    routes: Mapping[str, RouteSpec]
    rules: Sequence[Rule] = ()
    default: str = "default"

    def __post_init__(self) -> None:
        names = {self.default, *(rule.route for rule in self.rules)}
        if missing := sorted(names - set(self.routes)):
            raise ValueError(f"unknown route(s) {', '.join(missing)}; known: {', '.join(sorted(self.routes))}")

    def choose(self, event: Any) -> str:
        return self.explain(event)[0]

    def explain(self, event: Any) -> tuple[str, str]:
        """The route for ``event`` and why it was chosen."""
        for rule in self.rules:
            if (why := rule.why(event)) is not None:
                return rule.route, why
        return self.default, "no rule matched: default route"

    async def __call__(self, call: Call, call_next: Next[R]) -> R:
        name, why = self.explain(call.event)
        spec = self.routes[name]
        call.route = name
        call.candidates = spec.candidates
        call.allow_heuristic = spec.heuristic
        call.decide(
            "route",
            name,
            model=spec.candidates[0].name if spec.candidates else None,
            candidates=[c.name for c in spec.candidates],
            heuristic=spec.heuristic,
            reason=why,
        )
        return await call_next(call)
