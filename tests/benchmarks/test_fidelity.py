"""Sim fidelity's pure parts: errors, tolerances, table rows, tokenizer ratio and the per-request pairing."""

from __future__ import annotations

import argparse
import math

import pytest

from benchmarks.fidelity import RunPlan, build_parser, build_workload, parse_variants, rendered_chars
from benchmarks.lib.fidelity_errors import (
    TABLE_HEADERS,
    Metric,
    Tolerance,
    chars_per_token,
    default_metrics,
    error_of,
    fidelity_rows,
    format_error,
    paired_ttft,
    run_metrics,
    sim_chars_per_token,
    table_cells,
    ttft_by_kind,
    within,
)
from benchmarks.lib.loadgen import RequestRecord
from benchmarks.lib.metrics import summarize_run

REL30 = Tolerance("rel", 0.30)
ABS05 = Tolerance("abs", 0.05)


def rec(session: str, ttft: float, *, turn: int = 0, prompt: int = 100, cached: int = 0, out: int = 4,
        status: int = 200) -> RequestRecord:
    return RequestRecord(session=session, turn=turn, status=status, start_s=0.0, e2e_s=ttft + 0.01 * (out - 1),
                         ttft_s=ttft, itl_s=[0.01] * (out - 1), prompt_tokens=prompt, output_tokens=out,
                         cached_tokens=cached, error=None if status == 200 else "boom")


def test_relative_and_absolute_errors() -> None:
    assert error_of(100.0, 130.0, REL30) == pytest.approx(0.30)
    assert error_of(100.0, 60.0, REL30) == pytest.approx(-0.40)
    assert error_of(0.64, 0.61, ABS05) == pytest.approx(-0.03)
    assert error_of(0.0, 0.0, REL30) == 0.0
    assert math.isnan(error_of(0.0, 1.0, REL30))
    assert math.isnan(error_of(math.nan, 1.0, ABS05))


def test_within_is_inclusive_and_nan_is_outside() -> None:
    assert within(error_of(100.0, 130.0, REL30), REL30)  # exactly at the bound
    assert not within(error_of(100.0, 131.0, REL30), REL30)
    assert within(-0.05, ABS05) and not within(0.051, ABS05)
    assert not within(math.nan, REL30)
    assert within(0.0, Tolerance("rel", 0.0))


def test_error_text_and_tolerance_text() -> None:
    assert format_error(-0.384, REL30) == "-38.4%"
    assert format_error(0.009, ABS05) == "+0.009"
    assert format_error(math.nan, REL30) == "nan"
    assert (REL30.describe(), ABS05.describe()) == ("±30%", "±0.05")
    with pytest.raises(ValueError):
        Tolerance("ratio", 0.1)


def test_rows_compare_each_metric_and_mark_verdicts() -> None:
    metrics = [Metric("hit_rate", "hit rate", ABS05), Metric("ttft_p50_ms", "TTFT p50 ms", REL30),
               Metric("missing", "missing", REL30)]
    rows = fidelity_rows("gsp", 4, {"hit_rate": 0.642, "ttft_p50_ms": 48.2},
                         {"hit_rate": 0.651, "ttft_p50_ms": 29.7}, metrics)
    assert [(r.metric, r.within) for r in rows] == [("hit rate", True), ("TTFT p50 ms", False), ("missing", False)]
    assert rows[1].error_text == "-38.4%"
    cells = table_cells(rows[1])
    assert len(cells) == len(TABLE_HEADERS)
    assert cells == ["gsp", 4, "TTFT p50 ms", 48.2, 29.7, "-38.4%", "±30%", "OUTSIDE"]
    assert table_cells(rows[0])[3:5] == [0.642, 0.651]


def test_default_metrics_use_the_given_tolerances() -> None:
    ms = {m.key: m.tol for m in default_metrics(hit_tol=0.02, latency_tol=0.5, tokens_tol=0.1)}
    assert ms["hit_rate"] == Tolerance("abs", 0.02)
    assert ms["ttft_p90_ms"] == Tolerance("rel", 0.5)
    assert ms["output_tokens_per_req"] == Tolerance("rel", 0.0)  # ignore_eos: lengths must match exactly


def test_run_metrics_from_known_records() -> None:
    records = [rec("a", 0.010, prompt=100, cached=0), rec("b", 0.020, prompt=300, cached=200),
               rec("c", 0.5, status=500)]
    m = run_metrics(summarize_run(records, wall_s=2.0), records)
    assert m["requests_ok"] == 2
    assert m["prompt_tokens_per_req"] == 200
    assert m["output_tokens_per_req"] == 4
    assert m["hit_rate"] == pytest.approx(0.5)
    assert m["ttft_p50_ms"] == pytest.approx(15.0)
    assert m["output_tok_per_s"] == pytest.approx(4.0)


def test_chars_per_token_rounds_for_the_integer_flag() -> None:
    assert chars_per_token(20048, 9722) == pytest.approx(2.062, abs=1e-3)
    assert sim_chars_per_token(2.062) == 2
    assert sim_chars_per_token(3.6) == 4
    assert sim_chars_per_token(0.2) == 1
    with pytest.raises(ValueError):
        chars_per_token(10, 0)


def test_variants_and_defaults_parse() -> None:
    assert parse_variants("auto, 4") == ["auto", "4"]
    for bad in ("0", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variants(bad)
    args = build_parser().parse_args([])
    assert (args.workloads, args.concurrency, args.sim_chars_per_token) == (["gsp", "multiturn"], [1, 4],
                                                                            ["auto", "4"])


def test_rendered_chars_pairs_records_with_their_requests() -> None:
    args = build_parser().parse_args(["--mt-conversations", "2", "--mt-turns", "2"])
    wl = build_workload(RunPlan("multiturn", 1, seed=3), args)
    reqs = {(s.id, t): r for s in wl.sessions for t, r in enumerate(s.turns)}
    records = [rec("c0", 0.01, turn=0, prompt=10), rec("c1", 0.01, turn=1, prompt=20),
               rec("c1", 0.01, turn=0, prompt=99, status=500), rec("zz", 0.01, prompt=1000)]
    chars, tokens = rendered_chars(wl, records, lambda msgs: "x" * len(msgs))
    assert tokens == 30
    assert chars == len(reqs[("c0", 0)].messages) + len(reqs[("c1", 1)].messages)


def test_paired_ttft_and_hit_miss_split() -> None:
    vllm = [rec("a", 0.050, cached=64), rec("b", 0.120), rec("c", 0.040, cached=32)]
    sim = [rec("a", 0.030, cached=64), rec("b", 0.125), rec("c", 0.020, cached=32), rec("d", 1.0)]
    p = paired_ttft(vllm, sim)
    assert p["n"] == 3
    assert p["median_diff_ms"] == pytest.approx(-20.0)
    assert p["median_ratio"] == pytest.approx(0.6)  # of 0.6, 1.04, 0.5
    k = ttft_by_kind(vllm)
    assert k["hit"] == {"n": 2, "ttft_p50_ms": 45.0}
    assert k["miss"] == {"n": 1, "ttft_p50_ms": 120.0}
