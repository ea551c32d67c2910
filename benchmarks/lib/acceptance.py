"""The acceptance lines a side-by-side run is judged by, per load point, as PASS/FAIL lines.

Two sets, both on our default policy (`cost`):

- the benchmarks issue's: TTFT p90 <= 0.7x the best other router's, and hit rate >= 0.95x the oracle
  (`verdict`);
- the router issue's routing-quality lines (formerly `benchmarks.quality`), judged for `cost` and
  `cost-tuned`: on gsp hit rate >= 0.9x the oracle (the best a fleet of that capacity can cache), hit
  rate >= round_robin's + 0.10 and max/mean <= 1.3; on multiturn max/mean <= 1.3 and hit rate >= 0.95x
  `pinned`'s (consistent_hash keyed by the session header) (`quality_lines`).

A line whose reference did not run (no round_robin, no pinned) is left out, never passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT = "cost"  # the router's default policy: the contender the acceptance lines judge
QUALITY_JUDGED = ("cost", "cost-tuned")  # `cost` with its defaults and with the profile's documented ratios
MAX_OVER_MEAN = 1.3


def _ran(rows: Sequence[dict[str, Any]], load: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["load"] == load and "summary" in r and r["summary"]["ok"]]


def verdict(rows: Sequence[dict[str, Any]], oracle_hit: float) -> dict[str, Any]:
    """The acceptance lines of the issue, per load point: our default vs the best other router."""
    out: dict[str, Any] = {}
    for load in dict.fromkeys(r["load"] for r in rows):
        at = _ran(rows, load)
        ours = next((r for r in at if r["contender"] == DEFAULT), None)
        peers = [r for r in at if r["kind"] != "ours"]
        if ours is None:
            out[load] = {"error": f"{DEFAULT} did not run"}
            continue
        best = min(peers, key=lambda r: r["summary"]["ttft_ms"]["p90"], default=None)
        line: dict[str, Any] = {"ours_ttft_p90_ms": ours["summary"]["ttft_ms"]["p90"],
                                "ours_hit_vs_oracle": ours.get("hit_vs_oracle"),
                                "hit_goal_0.95_met": (ours.get("hit_vs_oracle") or 0) >= 0.95,
                                "ours_failed": ours["summary"]["failed"]}
        if best is not None:
            ratio = ours["summary"]["ttft_ms"]["p90"] / best["summary"]["ttft_ms"]["p90"]
            line.update({"best_peer": best["contender"], "best_peer_ttft_p90_ms": best["summary"]["ttft_ms"]["p90"],
                         "ttft_p90_ratio": round(ratio, 3),
                         "ttft_goal_0.7_met": ratio <= 0.7 and not ours["summary"]["failed"]})
        else:
            line["best_peer"] = None
        out[load] = line
    return out


def quality_lines(workload: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The routing-quality lines for gsp and multiturn (none for other workloads), per load point."""
    if workload not in ("gsp", "multiturn"):
        return []
    lines: list[dict[str, Any]] = []
    for load in dict.fromkeys(r["load"] for r in rows):
        at = _ran(rows, load)
        by_name = {r["contender"]: r for r in at}

        def check(name: str, passed: bool, detail: str, load: str = load) -> None:
            lines.append({"load": load, "check": f"{workload}: {name}", "pass": bool(passed), "detail": detail})

        for c in (by_name[n] for n in QUALITY_JUDGED if n in by_name):
            s, label = c["summary"], c["contender"]
            if workload == "gsp":
                vs = c.get("hit_vs_oracle") or 0.0
                check(f"{label} hit rate >= 0.9 x oracle", vs >= 0.9,
                      f"{s['hit_rate']:.3f} = {vs:.3f} x oracle {c.get('oracle_hit_rate')}")
                if (rr := by_name.get("round_robin")) is not None:
                    rr_hit = rr["summary"]["hit_rate"]
                    check(f"{label} hit rate clearly above round_robin (+0.10)", s["hit_rate"] >= rr_hit + 0.10,
                          f"{s['hit_rate']:.3f} vs {rr_hit:.3f}")
            check(f"{label} max/mean <= {MAX_OVER_MEAN}", s["max_over_mean"] <= MAX_OVER_MEAN,
                  f"{s['max_over_mean']:.2f}")
            if workload == "multiturn" and (pinned := by_name.get("pinned")) is not None:
                p = pinned["summary"]["hit_rate"]
                check(f"{label} hit rate >= 0.95 x pinned", s["hit_rate"] >= 0.95 * p,
                      f"{s['hit_rate']:.3f} vs 0.95 x {p:.3f} = {0.95 * p:.3f}")
    return lines


def print_acceptance(res: dict[str, Any]) -> None:
    """Every acceptance line of one workload's result as PASS/FAIL."""
    for load, v in res["verdict"].items():
        if "error" in v:
            print(f"  {load}: {v['error']}")
            continue
        peer = (f"TTFT p90 {v['ours_ttft_p90_ms']} ms vs best other router {v['best_peer']} "
                f"{v['best_peer_ttft_p90_ms']} ms = {v['ttft_p90_ratio']:.2f}x "
                f"({'PASS' if v['ttft_goal_0.7_met'] else 'FAIL'} <= 0.7x)") if v.get("best_peer") else \
            "no other router ran"
        print(f"  {load}: {DEFAULT}: {peer}; hit rate {v['ours_hit_vs_oracle']} of oracle "
              f"({'PASS' if v['hit_goal_0.95_met'] else 'FAIL'} >= 0.95)")
    for line in res.get("acceptance", []):
        print(f"  {line['load']}: {'PASS' if line['pass'] else 'FAIL'}  {line['check']}: {line['detail']}")
