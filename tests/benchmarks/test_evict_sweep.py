"""The eviction sweep's verdict: precise is better only where it gains and loses nothing."""

from __future__ import annotations

from benchmarks.evict_sweep import main, verdict


def cell(hit: float, p90: float) -> dict[str, float]:
    return {"hit_rate": hit, "ttft_p90_ms": p90}


def test_a_higher_hit_rate_at_no_slower_ttft_is_better() -> None:
    assert verdict(cell(0.70, 100.0), cell(0.75, 100.5)) == "better"


def test_a_higher_hit_rate_bought_with_a_slower_p90_is_worse() -> None:
    assert verdict(cell(0.70, 100.0), cell(0.75, 150.0)) == "worse"


def test_differences_inside_the_bands_are_equal() -> None:
    assert verdict(cell(0.700, 100.0), cell(0.703, 101.0)) == "equal"


def test_a_small_sweep_runs_and_writes_its_cells(tmp_path) -> None:
    out = tmp_path / "sweep.json"
    assert main(["--engines", "llmd-8b", "--workloads", "multiturn", "--kv-fractions", "1.3", "--seeds", "1",
                 "--size", "1", "--out", str(out)]) == 0
    assert '"kv_fraction": 1.3' in out.read_text()
