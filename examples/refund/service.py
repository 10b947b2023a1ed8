"""Refund requests from customer emails: a service of its own on Stanchion's public API.

    stanchion run examples.refund.service:app        # or: faststream run examples.refund.service:app

Emails on ``emails.refund``; a ``ResultEnvelope[Refund]`` per email on ``emails.refund.extracted``; anything
that cannot be answered as a dead letter on ``dlq.emails.refund``. Models in ``policy.toml`` next to this file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from faststream.nats import NatsBroker
from pydantic import BaseModel, Field
from pydantic_ai import Agent

from stanchion import Stanchion


class Email(BaseModel):
    id: str = Field(min_length=1, max_length=200)
    sender: str
    body: str = Field(min_length=1, max_length=20_000)


Reason = Literal["damaged", "late", "wrong_item", "other"]


class Refund(BaseModel):
    order_id: str = Field(description="The order the customer wants refunded, as written in the email.")
    amount_eur: float = Field(ge=0, description="The amount to refund, in euros.")
    reason: Reason


refund_agent = Agent(
    output_type=Refund,
    name="refund",
    instructions="Extract the refund the customer asks for: the order id, the amount in euros, and why "
    "(damaged, late, wrong_item, or other).",
)

ORDER = re.compile(r"\border\s*(?:number|no\.?|#)?\s*:?\s*#?([A-Z0-9][A-Z0-9-]{2,})", re.IGNORECASE)
AMOUNT = re.compile(r"(?:€|\beur\s*)(\d+(?:[.,]\d{1,2})?)|(\d+(?:[.,]\d{1,2})?)\s*(?:€|eur\b|euros?\b)", re.IGNORECASE)
REASONS: dict[Reason, tuple[str, ...]] = {
    "damaged": ("damaged", "broken", "cracked", "smashed"),
    "late": ("late", "never arrived", "delayed", "still waiting"),
    "wrong_item": ("wrong item", "wrong size", "wrong colour", "not what i ordered"),
}


def regex_refund(email: Email) -> Refund:
    """The answer of last resort: order id, amount and reason by regular expressions."""
    text = email.body.lower()
    order, amount = ORDER.search(email.body), AMOUNT.search(email.body)
    euros = next((g for g in amount.groups() if g), "0") if amount else "0"
    reason: Reason = next((name for name, words in REASONS.items() if any(w in text for w in words)), "other")
    return Refund(
        order_id=order.group(1) if order else "unknown",
        amount_eur=float(euros.replace(",", ".")),
        reason=reason,
    )


broker = NatsBroker(os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(","))
reliable = Stanchion(broker, policy=Path(__file__).with_name("policy.toml"))


@reliable.agent(
    "emails.refund",
    name="refund",
    output="emails.refund.extracted",
    dead_letters="dlq.emails.refund",
    agent=refund_agent,
    heuristic=regex_refund,
)
def prompt(email: Email) -> str:
    return f"Email from {email.sender}:\n\n{email.body}"


app = reliable.app(title="refunds", description="Refund requests extracted from customer emails.")
