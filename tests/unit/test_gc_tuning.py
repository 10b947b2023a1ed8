"""``tune_gc``: the collector settings a running service switches to once start-up is over."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from stanchion.handlers.process import tune_gc
from stanchion.handlers.settings import Settings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tuning_raises_the_young_threshold_and_freezes_what_start_up_left(restore_gc: None) -> None:
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    tune_gc(12_345)
    assert gc.get_threshold() == (12_345, gen1, gen2)
    assert gc.get_freeze_count() > 0


def test_zero_leaves_the_collector_alone(restore_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_default_setting_tunes_and_a_negative_one_is_refused() -> None:
    assert Settings().gc_threshold == 10_000
    with pytest.raises(ValueError, match="gc_threshold"):
        Settings(gc_threshold=-1)
