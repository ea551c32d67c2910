"""Run summaries: known records give known percentiles, throughput, goodput, hit rate and balance."""

from __future__ import annotations

import math

import pytest

from benchmarks.lib.loadgen import LoadSpec, RequestRecord, arrival_times
from benchmarks.lib.metrics import Slo, imbalance, pcts, summarize_run, tpot_s
from benchmarks.lib.workloads import gsp


def rec(i: int, ttft: float, e2e: float, *, status: int = 200, out: int = 11, prompt: int = 100,
        cached: int = 0, replica: str | None = None) -> RequestRecord:
    return RequestRecord(session=f"s{i}", turn=0, status=status, start_s=0.0, e2e_s=e2e, ttft_s=ttft,
                         itl_s=[0.01] * (out - 1), prompt_tokens=prompt, output_tokens=out, cached_tokens=cached,
                         replica=replica, error=None if status == 200 else "shed")


def test_percentiles_of_one_to_hundred_ms() -> None:
    p = pcts([i / 1000 for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["mean"]) == (50.5, 90.1, 99.0, 50.5)


def test_tpot_excludes_the_first_token() -> None:
    assert tpot_s(rec(0, ttft=0.5, e2e=1.5, out=11)) == pytest.approx(0.1)
    assert tpot_s(rec(0, ttft=0.5, e2e=1.5, out=1)) is None


def test_imbalance_is_max_over_mean() -> None:
    assert imbalance([4, 4, 4, 4]) == 1.0
    assert imbalance([16, 0, 0, 0]) == 4.0
    assert math.isnan(imbalance([]))


def test_throughput_hit_rate_and_shares() -> None:
    records = [rec(i, 0.1, 0.2, prompt=100, cached=50 if i % 2 else 0, replica="r0" if i < 3 else "r1")
               for i in range(4)]
    s = summarize_run(records, wall_s=2.0)
    assert (s["ok"], s["req_per_s"], s["output_tok_per_s"]) == (4, 2.0, 22.0)
    assert s["hit_rate"] == 0.25
    assert s["per_replica"] == {"r0": 3, "r1": 1} and s["replica_share"] == {"r0": 0.75, "r1": 0.25}
    assert s["max_over_mean"] == 1.5


def test_engine_counts_override_the_header() -> None:
    s = summarize_run([rec(0, 0.1, 0.2, replica="r0")], 1.0, per_replica={"a": 1, "b": 1})
    assert s["max_over_mean"] == 1.0


def test_shed_requests_count_as_failures_and_against_goodput() -> None:
    records = [rec(0, 0.1, 0.2), rec(1, 0.1, 0.2), rec(2, None, 0.001, status=429), rec(3, None, 0.001, status=503)]
    s = summarize_run(records, wall_s=1.0, slo=Slo(ttft_s=1.0, tpot_s=1.0))
    assert (s["failed"], s["status_429"], s["status_503"]) == (2, 1, 1)
    assert s["goodput_req_per_s"] == 2.0 and s["good_share"] == 0.5
    assert s["ttft_ms"]["p50"] == 100.0  # latency over successes only, which is why failures are shown


def test_slow_requests_are_not_good() -> None:
    s = summarize_run([rec(0, 3.0, 3.5), rec(1, 0.1, 0.2)], wall_s=1.0, slo=Slo(ttft_s=2.0, tpot_s=1.0))
    assert s["goodput_req_per_s"] == 1.0


def test_load_spec_needs_exactly_one_mode() -> None:
    with pytest.raises(ValueError):
        LoadSpec()
    with pytest.raises(ValueError):
        LoadSpec(concurrency=2, rate=1.0)
    assert (LoadSpec(rate=0).mode, LoadSpec(rate=2).label(), LoadSpec(concurrency=4).label()) == \
        ("trace", "2/s", "c=4")


def test_poisson_arrivals_are_seeded_with_the_given_mean_rate() -> None:
    wl = gsp(groups=50, questions=20, system_tokens=1, question_tokens=1, output_tokens=1)
    times = arrival_times(wl, LoadSpec(rate=10.0, seed=1))
    assert times == arrival_times(wl, LoadSpec(rate=10.0, seed=1))
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert len(times) / times[-1] == pytest.approx(10.0, rel=0.1)
