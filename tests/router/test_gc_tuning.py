"""router.gc_tuning: a started router freezes its start-up objects, collects young objects rarely, and
gives the collector back at shutdown; a rebuild is re-frozen so what it replaced can be reclaimed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from config.router import parse_config
from router import runtime
from router.gc_tuning import GEN0_THRESHOLD, Tuning


class _Part:
    """A stand-in for a router part: in a reference cycle, as a dispatcher and its bound hook are."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def pristine_collector() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_apply_freezes_what_is_alive_and_raises_the_young_threshold() -> None:
    tuning = Tuning()
    tuning.apply()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GEN0_THRESHOLD
    tuning.release()


def test_release_unfreezes_and_restores_the_thresholds_found_before() -> None:
    gc.set_threshold(700, 11, 12)
    tuning = Tuning()
    tuning.apply()
    tuning.release()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (700, 11, 12)


def test_the_last_of_several_routers_to_stop_restores_the_thresholds() -> None:
    gc.set_threshold(700, 10, 10)
    first, second = Tuning(), Tuning()
    first.apply()
    second.apply()
    first.release()
    assert gc.get_threshold()[0] == GEN0_THRESHOLD  # the second still runs
    second.release()
    assert gc.get_threshold() == (700, 10, 10)


def test_disabled_leaves_the_collector_alone() -> None:
    gc.set_threshold(700, 10, 10)
    Tuning(enabled=False).apply()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (700, 10, 10)


def test_a_rebuild_reclaims_the_replaced_part_frozen_at_start_up() -> None:
    old = _Part()
    gone = weakref.ref(old)
    tuning = Tuning()
    tuning.apply(old)
    del old
    assert tuning.refresh(_Part(), enabled=True)
    assert gone() is None
    assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == GEN0_THRESHOLD
    tuning.release()


def test_nothing_is_redone_while_the_router_is_unchanged() -> None:
    part = _Part()
    tuning = Tuning()
    tuning.apply(part)
    assert not tuning.refresh(part, enabled=True)
    tuning.release()


def test_turning_it_off_by_reload_restores_the_defaults() -> None:
    gc.set_threshold(700, 10, 10)
    part = _Part()
    tuning = Tuning()
    tuning.apply(part)
    assert tuning.refresh(part, enabled=False)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_started_router_is_tuned_as_configured_and_stopping_gives_it_back(enabled: bool) -> None:
    gc.set_threshold(700, 10, 10)
    router = runtime.new_router(parse_config({"replicas": [{"name": "a", "url": "http://127.0.0.1:1"}],
                                              "gc_tuning": enabled}))
    await runtime.start(router)
    try:
        assert (gc.get_threshold()[0] == GEN0_THRESHOLD) is enabled
        assert (gc.get_freeze_count() > 0) is enabled
    finally:
        await runtime.stop(router)
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
