"""The built-in classifier and the refund handler in one app, each with its own section of one policy file.

    stanchion run examples.together:app

The classifier keeps its ``STANCHION_*`` subjects and streams (``tasks.classify`` → ``tasks.classified``); the
refund handler has its own (``emails.refund`` → ``emails.refund.extracted``). ``stanchion report`` shows each.
"""

from __future__ import annotations

import os
from pathlib import Path

from faststream.nats import NatsBroker

from examples.refund.service import Email, refund_agent, regex_refund
from stanchion import Stanchion
from stanchion.handlers.classify.app import declare

broker = NatsBroker(os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(","))
reliable = Stanchion(broker, policy=Path(__file__).with_name("together.toml"))
classifier = declare(reliable)


@reliable.agent(
    "emails.refund",
    name="refund",
    output="emails.refund.extracted",
    dead_letters="dlq.emails.refund",
    agent=refund_agent,
    heuristic=regex_refund,
)
def refund(email: Email) -> str:
    return f"Email from {email.sender}:\n\n{email.body}"


app = reliable.app(title="classifier and refunds")
