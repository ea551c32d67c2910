"""cost's candidate pre-filter against the full scan on the benchmark workloads (offline simulator)."""

import pytest

from benchmarks.candidates_check import run
from benchmarks.lib import workloads as wl


@pytest.mark.parametrize("name", ["gsp", "multiturn", "agentic"])
def test_the_pre_filter_never_picks_a_costlier_replica_than_the_full_scan(name: str) -> None:
    row = run(wl.build(name, seed=1)[0], replicas=48, concurrency=64, k=8)
    assert row["decisions"] == wl.build(name, seed=1)[0].num_requests
    assert row["costlier"] == 0  # where the picks differ, both cost the same within tie_tolerance
    assert row["k=8"]["hit_rate"] == pytest.approx(row["k=0"]["hit_rate"], abs=0.01)
    assert row["k=8"]["ttft_ms"]["mean"] == pytest.approx(row["k=0"]["ttft_ms"]["mean"], rel=0.03)
