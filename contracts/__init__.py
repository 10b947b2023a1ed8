"""Stanchion's wire contracts: the events it consumes and the envelopes it publishes.

Every model here is plain pydantic. Each carries a ``schema_version`` so consumers can evolve
with the contract: fields are only ever added (with defaults) within a major version.
"""

from stanchion.contracts.classify import (
    MAX_TEXT_LENGTH,
    TASK_EVENT_SCHEMA,
    Category,
    TaskClassification,
    TaskEvent,
)
from stanchion.contracts.envelopes import (
    DEAD_LETTER_SCHEMA,
    RESULT_SCHEMA,
    DeadLetter,
    Decision,
    ResultEnvelope,
    Usage,
)

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "MAX_TEXT_LENGTH",
    "RESULT_SCHEMA",
    "TASK_EVENT_SCHEMA",
    "Category",
    "DeadLetter",
    "Decision",
    "ResultEnvelope",
    "TaskClassification",
    "TaskEvent",
    "Usage",
]
