"""Calibration caching: what the cost policy and the calibrator keep between observations is what a fresh
computation would give (issue 12: the relative mode's bookkeeping made cheap, decisions unchanged)."""

import random

from policy_fixtures import features_with, view
from test_calibration import ENGINES, H100_PRIOR, observations

from router.calibration import CalibrationSettings, Calibrator, CostConstants
from router.policies.base import Outcome
from router.policies.cost import Cost


def test_relative_mode_keeps_only_cached_constants_a_fresh_computation_would_give():
    # An observation changes the observed replica's slowness, the fleet fit and maybe the reference; the
    # policy keeps the other replicas' cached constants unless the reference moved. Whatever it keeps must
    # be what the calibrator gives now.
    policy = Cost(seed=0)  # relative
    speeds = {"a": 1.0, "b": 1.1, "c": 1.6, "slow": 3.0}
    rng = random.Random(5)
    kept = 0
    for i in range(400):
        name = rng.choice(sorted(speeds))
        f = features_with(rng.randint(4, 60), f"{name}{i}-", rid=f"r{i}")
        decision = policy.choose(f, [view(name)])
        policy.on_dispatch(f, decision)
        ttft = speeds[name] * (0.01 + 2e-4 * f.token_estimate)
        policy.on_complete(f, decision, Outcome(ok=True, status=200, ttft_s=ttft, prompt_tokens=f.token_estimate,
                                                cached_tokens=0, completion_tokens=8,
                                                e2e_s=ttft + speeds[name] * 7 * 0.012))
        kept += sum(n != name for n in policy._constants)
        assert policy._constants == {n: policy._effective(n) for n in policy._constants}
        # the shared step is cached per constants: every replica priced with them reads what it would fresh
        for n, (*_, raw) in policy._constants.items():
            assert policy._shared.get(raw, policy.calibrator.shared_step(n)) == policy.calibrator.shared_step(n)
        for n in speeds:  # price every replica, busy (ours: reported ones finished since), so both caches hold it
            policy.estimate_cost(view(n, running=2, in_flight_requests=2, load_age_s=0.1), 64, f)
        assert policy._shared
        for n, (*_, raw) in policy._constants.items():
            assert policy._shared[raw] == policy.calibrator.shared_step(n)
    assert kept > 0 and policy.calibrator.speed("slow") > 1.5


def test_relative_mode_reads_between_observations_do_not_change_what_is_read_later():
    # The calibrator caches each replica's constants and the fleet fit's step times between observations:
    # reading after every observation must give, bit for bit, what a calibrator read only then gives.
    often, at_mid, at_end = (Calibrator(H100_PRIOR, CalibrationSettings(mode="relative")) for _ in range(3))
    engine = ENGINES["llmd-like"]
    names = ("slow", "a", "b")  # the last observations are equal replicas', which move the reference

    def read(calibrator):
        return [(calibrator.shared_step(n), calibrator.constants(n)) for n in names]

    streams = [observations(CostConstants(*(k * c for c in engine.as_tuple())), 50, seed=40 + i)
               for i, k in enumerate((3, 1, 1))]
    for samples in zip(*streams, strict=True):
        for name, sample in zip(names, samples, strict=True):
            for calibrator in (often, at_mid, at_end):
                calibrator.observe(name, sample)
            read(often)
    assert read(often) == read(at_mid)
    for sample in observations(CostConstants(*(6 * c for c in engine.as_tuple())), 20, seed=49):
        for calibrator in (often, at_mid, at_end):  # the slowest stays slowest: the reference stays put
            calibrator.observe("slow", sample)
        read(often)
    assert read(often) == read(at_end)
    assert at_end.speed("slow") > 3.5


def test_relative_mode_solves_the_fleet_fit_when_it_observes_not_when_a_decision_reads_it():
    # The fit moves only with an observation, which comes after a request: a decision must find it solved.
    calibrator = Calibrator(H100_PRIOR, CalibrationSettings(mode="relative", min_observations=5))
    for i, sample in enumerate(observations(ENGINES["llmd-like"], 20, seed=7)):
        calibrator.observe("a" if i % 2 else "b", sample)
        if calibrator._pooled.observations >= 5:
            assert calibrator._pooled._phi is not None and calibrator._fleet_steps is not None
    lazy = Calibrator(H100_PRIOR, CalibrationSettings(mode="relative", min_observations=5))
    for i, sample in enumerate(observations(ENGINES["llmd-like"], 20, seed=7)):
        lazy.observe("a" if i % 2 else "b", sample)
    lazy._fleet_steps = None  # as if never solved: the lazy read gives the same bits
    assert [lazy.shared_step(n) for n in "ab"] == [calibrator.shared_step(n) for n in "ab"]
