"""RedeliveryPolicy: the one backoff of every nak, by delivery number."""

from __future__ import annotations

import pytest

from stanchion.handlers.runtime.redelivery import RedeliveryPolicy


def test_each_delivery_waits_its_own_delay_and_the_last_delay_repeats() -> None:
    """Delivery n waits the n-th delay; past the list, the last one."""
    policy = RedeliveryPolicy((2.0, 10.0, 30.0), max_deliver=6)
    assert [policy.delay(n) for n in range(1, 6)] == [2.0, 10.0, 30.0, 30.0, 30.0]


def test_a_hint_longer_than_the_backoff_wins() -> None:
    """A failure that said how long to wait (Retry-After, open circuit) waits at least that long."""
    policy = RedeliveryPolicy((2.0,), max_deliver=3)
    assert policy.delay(1, hint=7.5) == 7.5
    assert policy.delay(1, hint=0.5) == 2.0


def test_no_delays_means_redeliver_at_once() -> None:
    assert RedeliveryPolicy((), max_deliver=2).delay(1) == 0.0


def test_the_last_delivery_is_the_max_deliver_th() -> None:
    policy = RedeliveryPolicy((1.0,), max_deliver=3)
    assert [policy.last(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


@pytest.mark.parametrize(("delays", "max_deliver"), [((-1.0,), 3), ((1.0,), 0)])
def test_bad_settings_fail_at_construction(delays: tuple[float, ...], max_deliver: int) -> None:
    with pytest.raises(ValueError, match="must"):
        RedeliveryPolicy(delays, max_deliver)
