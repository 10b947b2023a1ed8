"""The one redelivery backoff: how long a message waits before its next delivery."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RedeliveryPolicy:
    """Delays by delivery number, and how many deliveries an event gets.

    Used for every nak: an event whose candidates all failed transiently, and a message whose handling
    itself failed (a publish JetStream did not confirm). A failure that said how long to wait (``hint``:
    ``Retry-After``, an open circuit) waits at least that long.

    Args:
        delays_s: The delay after the first, second... delivery; the last one repeats. Empty: no delay.
        max_deliver: Deliveries before an event is dead-lettered ``exhausted``.
    """

    delays_s: Sequence[float] = (2.0, 10.0, 30.0, 60.0)
    max_deliver: int = 5

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.delays_s):
            raise ValueError(f"delays must not be negative: {tuple(self.delays_s)}")
        if self.max_deliver < 1:
            raise ValueError(f"max_deliver must be at least 1, not {self.max_deliver}")

    def delay(self, delivery: int, hint: float | None = None) -> float:
        """Seconds to wait before the delivery after ``delivery`` (1 = the first)."""
        delays = self.delays_s
        delay = delays[min(max(delivery, 1), len(delays)) - 1] if delays else 0.0
        return delay if hint is None else max(delay, hint)

    def last(self, delivery: int) -> bool:
        """Whether ``delivery`` is the last one JetStream will make."""
        return delivery >= self.max_deliver
