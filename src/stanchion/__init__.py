"""Stanchion: reliability middleware for event-driven LLM services on FastStream and NATS.

Declare typed pydantic-ai agents as handlers on your own ``NatsBroker``::

    broker = create_broker(load_settings())            # or your own NatsBroker
    reliable = Stanchion(broker, policy="policy.toml")

    @reliable.agent("emails.refund", output="emails.refund.extracted", agent=refund_agent, heuristic=regex)
    def prompt(email: Email) -> str:
        return email.body

    app = reliable.app()                               # `stanchion run svc:app` or `faststream run svc:app`

The reliability stack itself (``stanchion.middleware``) works in any asyncio program. In the repository the
packages live at the root (``contracts/``, ``middleware/``, ``handlers/``); this directory links them in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stanchion.contracts import DeadLetter, Decision, ResultEnvelope, Usage
    from stanchion.handlers.api import Handler, Predicate, Stanchion
    from stanchion.handlers.errors import ConfigError
    from stanchion.handlers.nats.broker import create_broker
    from stanchion.handlers.policy import Policy, load_policy
    from stanchion.handlers.settings import Settings, load_settings

# Loaded on first use, so that `import stanchion.middleware` (the stack alone) loads no FastStream.
_WHERE = {
    "ConfigError": "stanchion.handlers.errors",
    "DeadLetter": "stanchion.contracts",
    "Decision": "stanchion.contracts",
    "Handler": "stanchion.handlers.api",
    "Policy": "stanchion.handlers.policy",
    "Predicate": "stanchion.handlers.api",
    "ResultEnvelope": "stanchion.contracts",
    "Settings": "stanchion.handlers.settings",
    "Stanchion": "stanchion.handlers.api",
    "Usage": "stanchion.contracts",
    "create_broker": "stanchion.handlers.nats.broker",
    "load_policy": "stanchion.handlers.policy",
    "load_settings": "stanchion.handlers.settings",
}

__all__ = [
    "ConfigError",
    "DeadLetter",
    "Decision",
    "Handler",
    "Policy",
    "Predicate",
    "ResultEnvelope",
    "Settings",
    "Stanchion",
    "Usage",
    "create_broker",
    "load_policy",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stanchion' has no attribute {name!r}")
