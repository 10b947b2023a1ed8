"""The keyword heuristic: a non-LLM classifier that answers when every model has failed."""

from __future__ import annotations

import re

from stanchion.contracts import Category, TaskClassification, TaskEvent

_KEYWORDS: dict[Category, tuple[str, ...]] = {
    "bug": (
        "bug",
        "error",
        "exception",
        "crash",
        "crashes",
        "broken",
        "fails",
        "failing",
        "failure",
        "traceback",
        "500",
        "regression",
        "doesn't work",
        "does not work",
        "not working",
        "stack trace",
        "wrong",
        "fail",
        "timeout",
        "typo",
        "outage",
        "does not expire",
        "vulnerability",
        "leak",
    ),
    "feature": (
        "feature",
        "add",
        "support",
        "would be nice",
        "request",
        "please add",
        "enhancement",
        "allow",
        "ability to",
        "option to",
        "could you add",
        "wish",
        "improve",
    ),
    "question": (
        "how do",
        "how can",
        "how to",
        "what is",
        "why does",
        "is it possible",
        "can i",
        "question",
        "?",
        "where is",
        "does it",
        "help",
    ),
}
_URGENT = ("urgent", "asap", "critical", "outage", "down", "production", "security", "data loss", "blocker")
_LOW = ("minor", "typo", "cosmetic", "someday", "nice to have", "low priority")


def _score(text: str, words: tuple[str, ...]) -> int:
    return sum(1 for word in words if (word in text if not word.isalnum() else re.search(rf"\b{word}\b", text)))


def classify(event: TaskEvent) -> TaskClassification:
    """Classify by keywords: the category with most hits wins; urgency words raise the priority."""
    text = event.text.lower()
    scores = {category: _score(text, words) for category, words in _KEYWORDS.items()}
    best: Category = max(scores, key=lambda c: scores[c])
    hits = scores[best]
    category: Category = best if hits else "other"
    priority = 3
    if category == "bug":
        priority = 4
    if _score(text, _URGENT):
        priority = 5
    elif _score(text, _LOW):
        priority = 1 if category != "bug" else 2
    total = sum(scores.values())
    confidence = 0.2 if not hits else round(min(0.6, 0.3 + 0.3 * hits / max(total, 1)), 2)
    summary = " ".join(event.text.split())
    summary = summary if len(summary) <= 120 else summary[:117] + "..."
    return TaskClassification(category=category, priority=priority, confidence=confidence, summary=summary)
