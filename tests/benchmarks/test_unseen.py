"""benchmarks.unseen: random engine profiles, seeded, within their ranges, run through the matrix's cells."""

import json
import math

import pytest

from benchmarks import matrix, unseen
from benchmarks.lib import workloads as wl
from engine_server.sim import timing


def test_the_draw_is_a_function_of_the_seed_and_a_larger_draw_extends_a_smaller_one():
    assert unseen.draw_engines(6, seed=1) == unseen.draw_engines(6, seed=1)
    assert unseen.draw_engines(6, seed=1) != unseen.draw_engines(6, seed=2)
    assert unseen.draw_engines(6, seed=1)[:3] == unseen.draw_engines(3, seed=1)


def test_every_drawn_parameter_lies_in_its_range():
    lo, hi = zip(*unseen.RANGES.values(), strict=True)
    bounds = dict(zip(unseen.RANGES, zip(lo, hi, strict=True), strict=True))
    engines = unseen.draw_engines(200, seed=7)
    for e in engines:
        for name in ("request_overhead_s", "prefill_per_token_s", "decode_step_s", "decode_per_seq_s",
                     "kv_capacity"):
            low, high = bounds[name]
            assert low * 0.999 <= getattr(e, name) <= high * 1.001, (e, name)
        assert bounds["max_num_seqs"][0] <= e.max_num_seqs <= bounds["max_num_seqs"][1]
        if e.slow_factor is not None:
            assert bounds["slow_factor"][0] <= e.slow_factor <= bounds["slow_factor"][1]
    slow = sum(e.slow_factor is not None for e in engines)
    assert 40 <= slow <= 100  # about a third of 200 fleets have one slower replica


def test_a_drawn_engine_has_exactly_the_drawn_cost_constants_and_its_slow_replica_is_slower():
    e = next(e for e in unseen.draw_engines(50, seed=3) if e.slow_factor)
    fleet = e.profiles()
    assert len(fleet) == matrix.REPLICAS
    assert fleet[0].cost_constants() == pytest.approx({
        "request_overhead_s": e.request_overhead_s, "prefill_s_per_token": e.prefill_per_token_s,
        "decode_s_per_seq": e.decode_per_seq_s, "decode_step_s": e.decode_step_s})
    assert fleet[-1].step_time_s(100, 2) == pytest.approx(e.slow_factor * fleet[0].step_time_s(100, 2))


def test_registering_an_engine_for_the_matrix_cell_runner_leaves_no_trace():
    e = unseen.draw_engines(1, seed=1)[0]
    before = (dict(matrix.ENGINES), dict(matrix.CAPACITY), dict(timing.PROFILES))
    with unseen.registered(e) as key:
        assert matrix.profiles(key) == e.profiles()
        assert matrix.CAPACITY[key] == e.kv_capacity
    assert before == (matrix.ENGINES, matrix.CAPACITY, timing.PROFILES)


def test_a_tiny_run_reports_each_cell_against_the_best_other_and_cache_aware(tmp_path, monkeypatch):
    tiny = wl.multiturn(conversations=4, turns=2, system_tokens=64, first_user_tokens=96, user_tokens=16,
                        output_tokens=4, seed=1)
    monkeypatch.setattr(matrix, "workload_of", lambda name, seed, size=1: tiny)
    out = tmp_path / "unseen.json"
    assert unseen.main(["--engines-n", "2", "--workloads", "multiturn", "--contenders",
                        "cost,round_robin,cache_aware", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [c["engine"] for c in data["cells"]] == ["u1-00", "u1-01"]
    cell = data["cells"][0]
    runs = cell["runs"]
    best = min(runs[c]["ttft_p90_ms"] for c in ("round_robin", "cache_aware"))
    assert cell["ratios"]["ttft_p90_vs_best"] == pytest.approx(runs["cost"]["ttft_p90_ms"] / best, abs=1e-3)
    assert cell["ratios"]["ttft_p90_vs_cache_aware"] == pytest.approx(
        runs["cost"]["ttft_p90_ms"] / runs["cache_aware"]["ttft_p90_ms"], abs=1e-3)
    assert cell["engine_params"]["name"] == "u1-00"
    summary = data["summary"]["c=16"]
    assert summary["cells"] == 2 and math.isfinite(summary["geo_mean_vs_best"])
    assert len(data["summary"]["worst"]) == 2
