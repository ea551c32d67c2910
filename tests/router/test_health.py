"""The health state machine, driven by hand with an injected clock (no event loop)."""

from __future__ import annotations

import pytest

from router.replicas.health import HealthConfig, HealthTracker, HealthTransition

CFG = HealthConfig(failures_to_eject=3, checks_to_eject=2, successes_to_readmit=2, base_ejection_s=5.0,
                   max_ejection_s=120.0, trial_timeout_s=30.0)


def tracker() -> HealthTracker:
    return HealthTracker(CFG)


def fail(t: HealthTracker, now: float, n: int = 3) -> HealthTransition | None:
    """n failures at ``now``; returns the first transition they caused."""
    transitions = [t.record_failure(now, "connect") for _ in range(n)]
    return next((tr for tr in transitions if tr is not None), None)


def eject_then_reach_half_open(t: HealthTracker, now: float) -> float:
    """Eject via passive failures and return the time the replica turns half-open."""
    transition = fail(t, now)
    assert transition is not None and transition.new == "ejected"
    return now + transition.ejection_s


def test_ejects_after_consecutive_passive_failures() -> None:
    t = tracker()
    transition = fail(t, 0.0, 3)
    assert t.state == "ejected" and t.ejections == 1
    assert transition == HealthTransition("healthy", "ejected", transition.reason, 0.0, 5.0)
    assert not t.admits(0.0)


def test_does_not_eject_before_threshold() -> None:
    t = tracker()
    fail(t, 0.0, 2)
    assert t.state == "healthy" and t.admits(0.0)


def test_success_resets_the_failure_streak() -> None:
    t = tracker()
    fail(t, 0.0, 2)
    t.record_success(0.1)
    fail(t, 0.2, 2)
    assert t.state == "healthy"


def test_ejects_after_consecutive_failed_checks_not_before() -> None:
    t = tracker()
    t.record_check(False, 0.0)
    assert t.state == "healthy"
    t.record_check(False, 2.0)
    assert t.state == "ejected"


def test_stays_ejected_for_the_ejection_time_even_if_checks_turn_good() -> None:
    t = tracker()
    fail(t, 0.0)
    t.record_check(True, 1.0)
    t.record_check(True, 3.0)
    assert t.state == "ejected" and not t.admits(4.99)


def test_half_open_admits_exactly_one_trial() -> None:
    t = tracker()
    half_open_at = eject_then_reach_half_open(t, 0.0)
    assert t.admits(half_open_at) and t.state == "half_open"
    assert t.begin_trial(half_open_at)
    assert not t.admits(half_open_at + 0.1)
    assert not t.begin_trial(half_open_at + 0.1)


def test_trial_success_readmits() -> None:
    t = tracker()
    at = eject_then_reach_half_open(t, 0.0)
    t.begin_trial(at)
    transition = t.record_success(at + 0.5)
    assert transition is not None and (transition.old, transition.new) == ("half_open", "healthy")
    assert t.admits(at + 0.5) and t.begin_trial(at + 0.6) and t.admits(at + 0.6)


def test_trial_failure_re_ejects_for_longer() -> None:
    t = tracker()
    at = eject_then_reach_half_open(t, 0.0)
    t.begin_trial(at)
    transition = t.record_failure(at + 0.5, "timeout")
    assert transition is not None and transition.new == "ejected" and transition.ejection_s == 10.0
    assert t.ejections == 2 and not t.admits(at + 10.0) and t.admits(at + 10.5)


def test_good_checks_readmit_once_half_open() -> None:
    t = tracker()
    t.record_check(False, 0.0)
    t.record_check(False, 2.0)  # ejected until 7.0
    t.record_check(True, 4.0)
    t.record_check(True, 6.0)
    assert t.state == "ejected"
    transition = t.record_check(True, 8.0)
    assert transition is not None and transition.new == "healthy"


def test_failed_check_while_half_open_re_ejects() -> None:
    t = tracker()
    at = eject_then_reach_half_open(t, 0.0)
    transition = t.record_check(False, at + 0.1)
    assert transition is not None and transition.new == "ejected" and transition.ejection_s == 10.0


def test_flapping_replica_is_ejected_longer_each_time_up_to_the_cap() -> None:
    t = tracker()
    now, durations = 0.0, []
    for _ in range(7):
        transition = fail(t, now)  # fails right after each readmission
        assert transition is not None
        durations.append(transition.ejection_s)
        now += transition.ejection_s
        t.begin_trial(now)
        t.record_success(now)
        now += 1.0
    assert durations == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0]


def test_ejection_time_decays_after_staying_healthy() -> None:
    t = tracker()
    now = eject_then_reach_half_open(t, 0.0)
    now = eject_then_reach_half_open(t, now)  # the second ejection lasted 10 s
    t.record_success(now)  # healthy again
    shortly = fail(t, now + 49.0)  # less than 10 x base of good behaviour: still doubled
    assert shortly is not None and shortly.ejection_s == 20.0

    t2 = tracker()
    now = eject_then_reach_half_open(t2, 0.0)
    now = eject_then_reach_half_open(t2, now)
    t2.record_success(now)
    later = fail(t2, now + 50.0)
    assert later is not None and later.ejection_s == 5.0


def test_draining_is_not_admitted_and_not_a_failure() -> None:
    t = tracker()
    t.set_draining(True)
    assert not t.admits(0.0) and not t.begin_trial(0.0)
    fail(t, 0.0, 10)  # "503 draining" answers while the router catches up
    assert t.state == "healthy" and t.ejections == 0
    t.set_draining(False)
    assert t.admits(1.0)


def test_engine_undrain_does_not_cancel_an_admin_drain() -> None:
    t = tracker()
    t.set_draining(True, source="admin")
    t.set_draining(False)  # the engine says it is not draining
    assert t.draining and not t.admits(0.0)


def test_lost_trial_frees_its_slot_after_the_trial_timeout() -> None:
    t = tracker()
    at = eject_then_reach_half_open(t, 0.0)
    t.begin_trial(at)
    assert not t.admits(at + 29.0)
    assert t.admits(at + 30.0)


def test_end_trial_gives_the_slot_back_without_a_verdict() -> None:
    t = tracker()
    at = eject_then_reach_half_open(t, 0.0)
    t.begin_trial(at)
    t.end_trial(at + 0.1)
    assert t.state == "half_open" and t.admits(at + 0.1)


def test_stragglers_do_not_extend_an_ejection() -> None:
    t = tracker()
    fail(t, 0.0)
    fail(t, 1.0, 5)  # requests sent before the ejection still failing
    t.record_success(2.0)
    assert t.ejections == 1 and t.ejected_until == 5.0 and t.state == "ejected"


def test_on_change_sees_every_transition() -> None:
    seen: list[tuple[str, str]] = []
    t = HealthTracker(CFG, on_change=lambda tr: seen.append((tr.old, tr.new)))
    at = eject_then_reach_half_open(t, 0.0)
    t.admits(at)
    t.record_success(at)
    assert seen == [("healthy", "ejected"), ("ejected", "half_open"), ("half_open", "healthy")]


@pytest.mark.parametrize("bad", [{"failures_to_eject": 0}, {"base_ejection_s": 0.0},
                                 {"max_ejection_s": 1.0}, {"trial_timeout_s": 0.0}])
def test_config_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HealthConfig(**bad)  # type: ignore[arg-type]
