"""compare's routing-quality acceptance lines (formerly `benchmarks.quality`): what each line judges."""

from __future__ import annotations

from typing import Any

from benchmarks.lib.acceptance import quality_lines


def row(name: str, hit: float, max_over_mean: float = 1.0, hit_vs_oracle: float = 1.0) -> dict[str, Any]:
    return {"contender": name, "kind": "ours", "load": "c=16", "hit_vs_oracle": hit_vs_oracle,
            "oracle_hit_rate": 0.8, "summary": {"ok": 10, "hit_rate": hit, "max_over_mean": max_over_mean}}


def verdicts(lines: list[dict[str, Any]]) -> dict[str, bool]:
    return {line["check"]: line["pass"] for line in lines}


def test_gsp_judges_cost_against_the_oracle_round_robin_and_balance() -> None:
    lines = quality_lines("gsp", [row("cost", 0.78, 1.25, 0.975), row("round_robin", 0.5)])
    assert verdicts(lines) == {"gsp: cost hit rate >= 0.9 x oracle": True,
                               "gsp: cost hit rate clearly above round_robin (+0.10)": True,
                               "gsp: cost max/mean <= 1.3": True}
    assert all(line["load"] == "c=16" for line in lines)


def test_gsp_fails_a_cost_that_is_barely_above_round_robin_or_unbalanced() -> None:
    v = verdicts(quality_lines("gsp", [row("cost", 0.55, 1.6, 0.7), row("round_robin", 0.5)]))
    assert not any(v.values()) and len(v) == 3


def test_multiturn_judges_cost_and_cost_tuned_against_pinned() -> None:
    v = verdicts(quality_lines("multiturn", [row("cost", 0.86), row("cost-tuned", 0.70), row("pinned", 0.88),
                                             row("round_robin", 0.5)]))
    assert v == {"multiturn: cost max/mean <= 1.3": True, "multiturn: cost hit rate >= 0.95 x pinned": True,
                 "multiturn: cost-tuned max/mean <= 1.3": True,
                 "multiturn: cost-tuned hit rate >= 0.95 x pinned": False}


def test_a_line_whose_reference_did_not_run_is_left_out_not_passed() -> None:
    assert "multiturn: cost hit rate >= 0.95 x pinned" not in verdicts(quality_lines("multiturn", [row("cost", 0.9)]))
    assert "gsp: cost hit rate clearly above round_robin (+0.10)" not in verdicts(quality_lines("gsp",
                                                                                                [row("cost", 0.9)]))


def test_other_workloads_have_no_quality_lines() -> None:
    assert quality_lines("agentic", [row("cost", 0.9), row("pinned", 0.9)]) == []
