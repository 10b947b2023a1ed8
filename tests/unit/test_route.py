"""Route: the first matching rule names the route for an event; its spec sets the candidates."""

from __future__ import annotations

import pytest

from stanchion.contracts import TaskEvent
from stanchion.handlers.classify.policy import kind_or_length
from stanchion.middleware import Call, Candidate, Route, RouteSpec, Rule

FAST = Candidate("fast")
STRONG = Candidate("strong")
BACKUP = Candidate("backup")

ROUTES = {
    "default": RouteSpec((FAST, BACKUP)),
    "complex": RouteSpec((STRONG, BACKUP), heuristic=False),
    "long": RouteSpec((STRONG,)),
    "urgent": RouteSpec((BACKUP,)),
}


def event(text: str = "the button does nothing", kind: str = "simple", source: str | None = None) -> TaskEvent:
    return TaskEvent(id="e1", text=text, kind=kind, source=source)


async def route_of(route: Route, task: TaskEvent) -> Call:
    """Run ``route`` on one event and return the call as the next step saw it."""
    seen: list[Call] = []

    async def call_next(call: Call) -> str:
        seen.append(call)
        return "answer"

    assert await route(Call(event=task), call_next) == "answer"
    return seen[0]


async def test_a_kind_rule_picks_its_route() -> None:
    """An event whose kind is listed goes to the rule's route."""
    route = Route(ROUTES, [Rule("complex", kind_or_length(frozenset({"complex", "hard"}), None))])

    assert (await route_of(route, event(kind="hard"))).route == "complex"


async def test_min_text_length_rule_picks_its_route() -> None:
    """An event whose text is at least ``min_text_length`` long goes to the rule's route; a shorter one does not."""
    route = Route(ROUTES, [Rule("long", kind_or_length(frozenset(), 10))])

    assert (await route_of(route, event(text="x" * 10))).route == "long"
    assert (await route_of(route, event(text="x" * 9))).route == "default"


async def test_when_predicate_picks_its_route() -> None:
    """Any predicate on the event can name a route."""
    route = Route(ROUTES, [Rule("urgent", when=lambda e: e.source == "pager")])

    assert (await route_of(route, event(source="pager"))).route == "urgent"
    assert (await route_of(route, event(source="email"))).route == "default"


async def test_a_rule_matches_when_any_of_its_conditions_holds() -> None:
    """Conditions of one rule are alternatives: the kind alone or the length alone is enough."""
    route = Route(ROUTES, [Rule("complex", kind_or_length(frozenset({"complex"}), 100))])

    assert (await route_of(route, event(kind="complex"))).route == "complex"
    assert (await route_of(route, event(text="x" * 100))).route == "complex"
    assert (await route_of(route, event())).route == "default"


async def test_first_matching_rule_wins() -> None:
    """When several rules match, the one listed first names the route."""
    rules = [
        Rule("long", kind_or_length(frozenset(), 5)),
        Rule("complex", kind_or_length(frozenset({"complex"}), None)),
    ]

    assert (await route_of(Route(ROUTES, rules), event(kind="complex"))).route == "long"
    assert (await route_of(Route(ROUTES, rules[::-1]), event(kind="complex"))).route == "complex"


async def test_unmatched_event_goes_to_the_default_route() -> None:
    """With no rule matching, the configured default route applies."""
    route = Route(ROUTES, [Rule("complex", kind_or_length(frozenset({"complex"}), None))], default="urgent")

    call = await route_of(route, event())
    assert call.route == "urgent"
    assert call.candidates == (BACKUP,)


async def test_route_sets_candidates_heuristic_and_a_decision() -> None:
    """The chosen spec's candidates and heuristic flag land on the call, with a ``route`` decision."""
    route = Route(ROUTES, [Rule("complex", kind_or_length(frozenset({"complex"}), None))])

    call = await route_of(route, event(kind="complex"))

    assert call.candidates == (STRONG, BACKUP)
    assert call.allow_heuristic is False
    assert [(d.kind, d.detail, d.model) for d in call.decisions] == [("route", "complex", "strong")]
    assert call.decisions[0].data == {
        "candidates": ["strong", "backup"],
        "heuristic": False,
        "reason": "kind is complex",
    }


async def test_the_route_decision_says_why() -> None:
    """The rule's matching condition, or that no rule matched."""
    route = Route(
        ROUTES,
        [Rule("complex", kind_or_length(frozenset({"complex"}), None)), Rule("long", kind_or_length(frozenset(), 10))],
    )

    assert route.explain(event(kind="complex")) == ("complex", "kind is complex")
    assert route.explain(event(text="x" * 12)) == ("long", "text length 12 >= 10")
    assert route.explain(event(text="short")) == ("default", "no rule matched: default route")


async def test_route_without_candidates_decides_with_no_model() -> None:
    """A heuristic-only route is recorded with no model."""
    call = await route_of(Route({"default": RouteSpec(())}), event())

    assert call.candidates == ()
    assert call.allow_heuristic is True
    assert call.decisions[0].model is None


def test_rules_are_predicates_over_any_event_object() -> None:
    """A rule is any predicate on the event; one returning True is named by the rule's name in the decision."""

    def urgent(event: object) -> bool:
        return getattr(event, "urgent", False) is True

    route = Route(ROUTES, [Rule("urgent", urgent, "urgent flag")])

    assert route.choose(object()) == "default"
    assert route.explain(type("Paged", (), {"urgent": True})()) == ("urgent", "urgent flag matched")


@pytest.mark.parametrize(
    ("rules", "default", "missing"),
    [
        ([Rule("nowhere", kind_or_length(frozenset({"x"}), None))], "default", "nowhere"),
        ([], "fallback", "fallback"),
    ],
    ids=["rule", "default"],
)
def test_unknown_route_names_fail_at_construction(rules: list[Rule], default: str, missing: str) -> None:
    """A rule or default naming a route that does not exist is a ``ValueError`` when the Route is built."""
    with pytest.raises(ValueError, match=f"unknown route\\(s\\) {missing};"):
        Route(ROUTES, rules, default=default)
