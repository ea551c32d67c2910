"""The calibration matrix (issue 15): engines unlike the defaults, one profile per replica, goal ratios."""

from __future__ import annotations

import math

import pytest

from benchmarks import matrix
from benchmarks.lib import workloads as wl
from benchmarks.lib.loadgen import LoadSpec
from benchmarks.simulate import simulate
from engine_server.sim.timing import get_profile, slowed


def test_a_slowed_engine_takes_twice_as_long_for_the_same_step() -> None:
    base = get_profile("llmd-8b")
    assert math.isclose(slowed(base, 2.0).step_time_s(300, 4), 2 * base.step_time_s(300, 4))
    assert slowed(base, 2.0).max_num_seqs == base.max_num_seqs


def test_every_matrix_engine_has_a_profile_per_replica_and_the_true_cost_constants() -> None:
    for engine in matrix.ENGINES:
        profiles = matrix.profiles(engine)
        assert len(profiles) == matrix.REPLICAS
        assert set(profiles[0].cost_constants()) == {"request_overhead_s", "prefill_s_per_token",
                                                     "decode_s_per_seq", "decode_step_s"}
    hetero = matrix.profiles("hetero")
    assert hetero[3].prefill_per_token_s == pytest.approx(2 * hetero[0].prefill_per_token_s)


def test_the_simulator_runs_one_profile_per_replica() -> None:
    w = wl.gsp(groups=4, questions=4, system_tokens=128, question_tokens=16, output_tokens=4, seed=1)
    kv = wl.kv_blocks_per_replica(w, 2)
    load = LoadSpec(concurrency=2, max_requests=w.num_requests)
    fast, mixed = (simulate(w, 2, "round_robin", profile=p, num_blocks=kv, load=load, seed=1)
                   for p in ("llmd-8b", [get_profile("llmd-8b"), slowed(get_profile("llmd-8b"), 3.0)]))
    by_replica = lambda run, name: [r.e2e_s for r in run.records if r.replica == name]  # noqa: E731
    assert sum(by_replica(mixed, "r1")) > 2 * sum(by_replica(fast, "r1"))
    with pytest.raises(ValueError, match="profiles for"):
        simulate(w, 2, "round_robin", profile=["llmd-8b"], num_blocks=kv, load=load)


def test_a_cell_reports_the_goal_ratios_against_the_best_other_contender() -> None:
    w = wl.multiturn(conversations=4, turns=3, system_tokens=64, first_user_tokens=96, user_tokens=16,
                     output_tokens=4, seed=1)
    cell = matrix.run_cell("tiny-seqs", w, ["cost", "round_robin", "cache_aware"], seed=1, concurrency=4)
    assert set(cell["runs"]) == {"cost", "round_robin", "cache_aware"}
    assert cell["best_ttft"] in ("round_robin", "cache_aware")
    best = min(cell["runs"][c]["ttft_p90_ms"] for c in ("round_robin", "cache_aware"))
    assert cell["ratios"]["ttft_p90_vs_best"] == pytest.approx(cell["runs"]["cost"]["ttft_p90_ms"] / best, abs=1e-3)
    assert set(cell["met"]) == set(matrix.GOALS)


@pytest.mark.parametrize("name", matrix.WORKLOADS)
def test_a_sized_workload_has_that_many_times_the_requests_of_the_same_shape(name: str) -> None:
    one, three = matrix.workload_of(name, seed=1), matrix.workload_of(name, seed=1, size=3)
    assert three.num_requests == 3 * one.num_requests
    assert three.name == one.name
