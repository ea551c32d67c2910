"""Tiny runs of the benchmark scripts: they start, measure something and write their JSON.

Each script runs as `python -m benchmarks.<name>` in a subprocess (as a user would run it), with its
engines and router in-process (`--inprocess`) and tiny workloads, so the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lib.report import format_table
from benchmarks.lib.stats import percentile, summarize

ROOT = Path(__file__).resolve().parents[1]


def run_script(module: str, out: Path, *args: str, timeout_s: float = 60.0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", module, "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_percentile_and_summary() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    s = summarize([0.001, 0.002, 0.003], scale=1e3)
    assert (s["n"], s["p50"], s["max"]) == (3, 2.0, 3.0)
    assert "policy" in format_table(["policy"], [["cost"]])


@pytest.mark.slow
def test_router_micro_runs(tmp_path: Path) -> None:
    data = run_script("benchmarks.router_micro", tmp_path / "micro.json", "--prefixes", "1000", "--iterations",
                      "200", "--inprocess", "--requests", "30", "--concurrency", "1", "4", "--gap-streams", "4",
                      "--gap-tokens", "4", "--gap-time-scale", "0.2")
    rows = data["decisions"]["policies"]
    assert {r["policy"] for r in rows} >= {"cost", "cache_aware", "round_robin"}
    assert all(c["choose_us"]["n"] > 0 for r in rows for c in r["cases"].values())
    # each probe's fastest of 3 passes, the first pass among them: never slower than the first pass alone
    assert all(c["choose_best_us"]["p99"] <= c["choose_us"]["p99"] for r in rows for c in r["cases"].values())
    # a fleet this small is priced in full (cost's pre-filter is for large ones)
    assert all(c["priced"]["max"] == r["replicas"] for r in rows if r["policy"] == "cost" for c in r["cases"].values())
    assert "proxy" not in data  # (b) is benchmarks.overhead's (tests/benchmarks/test_routers.py)
    assert all(lv[m]["errors"] == 0 for lv in data["chunk_gaps"]["levels"] for m in ("direct", "router"))


def test_router_micro_best_of_takes_each_probes_fastest_pass_over_the_probes_all_passes_reached() -> None:
    from benchmarks.router_micro import best_of

    assert best_of([[5, 9, 7, 8], [6, 3, 9], [4, 10, 8]]) == [4, 3, 7]


def test_quality_is_compare_with_its_contenders() -> None:
    """`python -m benchmarks.quality` runs compare: no peers, gsp and multiturn, `pinned` as the reference."""
    from benchmarks.compare import contenders, parse_args
    from benchmarks.quality import ARGS

    args = parse_args(ARGS)
    assert args.workloads == ["gsp", "multiturn"] and args.name == "quality"
    assert {c.name for c in contenders(args)} == {"cost", "cost-tuned", "cache_aware", "round_robin", "least_load",
                                                  "consistent_hash", "pinned"}
