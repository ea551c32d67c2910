"""Precise against approximate prefix matching as the KV cache shrinks, offline, on several engines.

    python -m benchmarks.evict_sweep                       # 3 engines x 3 workloads x 4 cache sizes x 3 seeds
    python -m benchmarks.evict_sweep --engines llmd-8b --workloads multiturn --kv-fractions 0.5,1.3

Issue 14's goal: the `cost` policy on the engines' KV events (``index: precise``) routes at least as well as
on its own guess (``index: approximate``) everywhere, and strictly better once the cache is small enough to
evict, where the guess keeps naming blocks the engine has dropped. Both run on the same simulator model of
announced KV events (`benchmarks.sim_processes`), one router process, so the index is the only difference.
The live counterpart is ``benchmarks.compare --kv-fraction``; this one is noise-free and covers engines
nobody tuned for (`benchmarks.matrix`'s profiles).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from benchmarks.lib.cli_help import DefaultsHelpFormatter
from benchmarks.lib.comma import comma_list, joined
from benchmarks.lib.defaults import RESULTS_DIR
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.lib.workloads import NAMES
from benchmarks.matrix import ENGINES
from benchmarks.processes import run_cell

INDEXES = ("approximate", "precise")
HEADERS = ["engine", "workload", "kv x footprint", "hit approx", "hit precise", "ttft p90 approx",
           "ttft p90 precise", "ttft ratio", "verdict"]


def run(engine: str, workload: str, fraction: float, index: str, seed: int, concurrency: int,
        size: int) -> dict[str, Any]:
    """One simulated run: `cost` with ``index``, the fleet's KV at ``fraction`` x the workload's footprint,
    one router process following the engines' announced KV events."""
    return run_cell(engine, workload, "cost", {"index": index}, 1, seed, concurrency, "random", size, fraction)


def verdict(approx: dict[str, float], precise: dict[str, float]) -> str:
    """"better" / "equal" / "worse" on both metrics: hit rate (0.005 band) and TTFT p90 (2 % band). Better
    on one and no worse on the other is "better"; worse on either is "worse"."""
    dh = precise["hit_rate"] - approx["hit_rate"]
    ratio = precise["ttft_p90_ms"] / approx["ttft_p90_ms"] if approx["ttft_p90_ms"] else 1.0
    hit = 1 if dh > 0.005 else -1 if dh < -0.005 else 0
    ttft = 1 if ratio < 0.98 else -1 if ratio > 1.02 else 0
    if hit < 0 or ttft < 0:
        return "worse"
    return "better" if hit > 0 or ttft > 0 else "equal"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evict_sweep", formatter_class=DefaultsHelpFormatter,
                                description="cost with index precise vs approximate over KV cache sizes, "
                                            "engines and workloads, in the offline simulator (issue 14).")
    p.add_argument("--engines", type=comma_list(choices=ENGINES), default="llmd-8b,slow-prefill,tiny-seqs",
                   help="benchmarks.matrix engines")
    p.add_argument("--workloads", type=comma_list(choices=NAMES), default="gsp,multiturn,agentic",
                   help="comma list")
    p.add_argument("--kv-fractions", type=comma_list(float), default="0.3,0.5,0.8,1.3",
                   help="fleet KV capacity as multiples of the workload's footprint (below 1 evicts)")
    p.add_argument("--seeds", type=comma_list(int), default="1,2,3",
                   help="comma list; each cell is the seeds' mean")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--size", type=int, default=4,
                   help="x this many sessions (gsp groups, multiturn conversations, agentic sessions): p90s of "
                        "the default ~100-request workloads rest on a handful of requests")
    p.add_argument("--out", default=None, help="JSON path (default results/evict-sweep.json)")
    args = p.parse_args(argv)
    seeds = args.seeds
    t0 = time.process_time()
    rows, cells = [], []
    for engine in args.engines:
        for workload in args.workloads:
            for fraction in args.kv_fractions:
                runs = {ix: [run(engine, workload, fraction, ix, s, args.concurrency, args.size) for s in seeds]
                        for ix in INDEXES}
                avg = {ix: {m: mean(r[m] for r in rs) for m in ("hit_rate", "ttft_p90_ms")}
                       for ix, rs in runs.items()}
                a, q = avg["approximate"], avg["precise"]
                ratio = q["ttft_p90_ms"] / a["ttft_p90_ms"] if a["ttft_p90_ms"] else float("nan")
                v = verdict(a, q)
                cells.append({"engine": engine, "workload": workload, "kv_fraction": fraction, "runs": runs,
                              "ttft_p90_ratio": round(ratio, 3), "verdict": v})
                rows.append([engine, workload, fraction, round(a["hit_rate"], 3), round(q["hit_rate"], 3),
                             round(a["ttft_p90_ms"], 1), round(q["ttft_p90_ms"], 1), round(ratio, 3), v])
                print(format_table(HEADERS, rows[-1:]), flush=True)
    print()
    print(format_table(HEADERS, rows))
    counts = {v: sum(c["verdict"] == v for c in cells) for v in ("better", "equal", "worse")}
    cpu = time.process_time() - t0
    print(f"\nprecise vs approximate: {counts['better']} better, {counts['equal']} equal, {counts['worse']} worse "
          f"of {len(cells)} cells; seeds {joined(seeds)}; {cpu:.1f} CPU s")
    out = Path(args.out) if args.out else RESULTS_DIR / "evict-sweep.json"
    write_json(out, {"machine": machine_info(), "seeds": seeds, "concurrency": args.concurrency, "size": args.size,
                     "counts": counts, "cpu_s": round(cpu, 1), "cells": cells})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
