"""Where answered events' results are kept, so a redelivered event is never sent to a model again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredResult:
    """A result envelope, whether its publication was confirmed, and the digest of the event it answered."""

    envelope: bytes
    published: bool
    digest: str = ""
    """SHA-256 (hex) of the answered event's canonical JSON; empty for results stored before digests were kept."""


class ResultStore(Protocol):
    """Result envelopes by key (the handler's scope and the event id: ``HandlerRuntime.key``).

    Stored before publishing, marked published after the stream confirmed it: a redelivery then knows whether
    to republish (crash in between) or only to ack.

    ``put`` of a result not yet published must be durable when it returns; the published mark may be sent
    without waiting: if it is lost, a redelivery republishes and the output stream's dedup drops the copy.
    """

    async def get(self, key: str) -> StoredResult | None: ...

    async def put(self, key: str, result: StoredResult) -> None: ...


class InMemoryResultStore:
    """For one process, in tests and benchmarks."""

    def __init__(self) -> None:
        self.items: dict[str, StoredResult] = {}

    async def get(self, key: str) -> StoredResult | None:
        return self.items.get(key)

    async def put(self, key: str, result: StoredResult) -> None:
        self.items[key] = result
