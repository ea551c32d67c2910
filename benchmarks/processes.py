"""K router processes against one, offline: hit rate and TTFT p90 ratios per matrix engine and workload.

    python -m benchmarks.processes --size 4 --seeds 1,2                       # precise, told N (as --workers N)
    python -m benchmarks.processes --size 4 --seeds 1,2 --untold-processes    # K lone routers, the "before"

Issue 14's goal for several router processes (K=4 keeps >= 0.95x one process's hit rate and its TTFT p90
within 10 %), asked of the simulator's model of K processes (`benchmarks.sim_processes`) on the engines
and cache sizes of `benchmarks.matrix`; docs/kv_events.md ("Many router processes") has the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from benchmarks.lib import workloads as wl
from benchmarks.lib.cli_help import DefaultsHelpFormatter
from benchmarks.lib.comma import comma_list, joined
from benchmarks.lib.defaults import RESULTS_DIR
from benchmarks.lib.loadgen import LoadSpec
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.matrix import CAPACITY, ENGINES, REPLICAS, profiles, workload_of
from benchmarks.sim_loop import DEFAULT_POLL_S, simulate
from benchmarks.sim_processes import SPREADS


def run_cell(engine: str, workload: str, policy: str, params: Mapping[str, Any], processes: int, seed: int,
             concurrency: int, spread: str, size: int = 1, capacity: float | None = None,
             poll_s: float = DEFAULT_POLL_S) -> dict[str, Any]:
    """One simulated run of a matrix cell (`benchmarks.matrix`'s engines and, unless ``capacity`` gives the
    fleet's KV as a multiple of the footprint, its cache sizes); engines polled every ``poll_s``."""
    w = workload_of(workload, seed, size)
    kv = wl.kv_blocks_per_replica(w, REPLICAS, CAPACITY.get(engine, 1.3) if capacity is None else capacity)
    load = LoadSpec(concurrency=concurrency, max_requests=w.num_requests, seed=seed)
    s = simulate(w, REPLICAS, policy, dict(params), profile=profiles(engine), num_blocks=kv, load=load,
                 seed=seed, router_processes=processes, kv_events=policy != "cost" or "index" in params,
                 spread=spread, poll_interval_s=poll_s).summary()
    return {"hit_rate": s["hit_rate"], "ttft_p90_ms": s["ttft_ms"]["p90"], "requests": s["requests"],
            "failed": s["failed"], "max_over_mean": s["max_over_mean"], "kv_blocks": kv}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.processes", formatter_class=DefaultsHelpFormatter,
        description="K router processes vs one in the offline simulator: hit rate and TTFT p90 ratios per "
                    "matrix engine and workload (issue 14: K=4 keeps >= 0.95x the hit rate, TTFT p90 within "
                    "10 %).")
    p.add_argument("--engines", type=comma_list(choices=ENGINES),
                   default="llmd-8b,slow-prefill,tiny-seqs,small-kv", help="comma list of benchmarks.matrix engines")
    p.add_argument("--workloads", type=comma_list(choices=wl.NAMES), default="gsp,multiturn,agentic",
                   help="comma list of workloads")
    p.add_argument("--policy", default="precise", help="policy name (precise and cost+index get KV events)")
    p.add_argument("--params", default="{}", help="policy params as JSON")
    p.add_argument("--processes", type=int, default=4, help="K, compared with 1")
    p.add_argument("--seeds", type=comma_list(int), default="1,2,3",
                   help="comma list; ratios are of the seeds' means")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--spread", choices=SPREADS, default="random",
                   help="how requests reach the processes (random: seeded, as SO_REUSEPORT over pooled "
                        "connections)")
    p.add_argument("--size", type=int, default=1,
                   help="x this many sessions (gsp groups, multiturn conversations, agentic sessions)")
    p.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S,
                   help="how often the engines' load reports are read (the router's default): how much the "
                        "processes know of each other's load")
    p.add_argument("--untold-processes", action="store_true",
                   help="do not pass router_processes=K to the K policies (by default they are told, as "
                        "--workers K tells its workers; benchmarks.compare has the same flag)")
    p.add_argument("--out", default=None, help="JSON path (default results/sim-processes-<policy>.json)")
    args = p.parse_args(argv)
    params = json.loads(args.params)
    seeds = args.seeds
    t0 = time.process_time()
    rows, cells = [], []
    for engine in args.engines:
        for workload in args.workloads:
            runs = {k: [run_cell(engine, workload, args.policy, told(params, k, not args.untold_processes),
                                 k, s, args.concurrency, args.spread, args.size, poll_s=args.poll_s)
                        for s in seeds] for k in (1, args.processes)}
            avg = {k: {m: mean(r[m] for r in rs) for m in ("hit_rate", "ttft_p90_ms")} for k, rs in runs.items()}
            one, many = avg[1], avg[args.processes]
            hit = many["hit_rate"] / one["hit_rate"] if one["hit_rate"] else float("nan")
            ttft = many["ttft_p90_ms"] / one["ttft_p90_ms"] if one["ttft_p90_ms"] else float("nan")
            cells.append({"engine": engine, "workload": workload, "runs": runs, "hit_ratio": round(hit, 3),
                          "ttft_p90_ratio": round(ttft, 3)})
            rows.append([engine, workload, round(one["hit_rate"], 3), round(many["hit_rate"], 3), round(hit, 3),
                         round(one["ttft_p90_ms"]), round(many["ttft_p90_ms"]), round(ttft, 3),
                         "yes" if hit >= 0.95 and ttft <= 1.10 else "NO"])
            print(format_table(HEADERS(args.processes), rows[-1:]), flush=True)
    print()
    print(format_table(HEADERS(args.processes), rows))
    cpu = time.process_time() - t0
    print(f"\n{args.policy} {params or ''}, seeds {joined(seeds)}, spread {args.spread}, poll {args.poll_s} s; "
          f"{cpu:.1f} CPU s")
    out = Path(args.out) if args.out else RESULTS_DIR / f"sim-processes-{args.policy}.json"
    write_json(out, {"machine": machine_info(), "policy": args.policy, "params": params,
                     "processes": args.processes, "tell_processes": not args.untold_processes, "size": args.size,
                     "seeds": seeds, "spread": args.spread, "poll_s": args.poll_s,
                     "concurrency": args.concurrency, "cpu_s": round(cpu, 1), "cells": cells})
    print(f"wrote {out}")
    return 0


def told(params: Mapping[str, Any], k: int, tell: bool) -> dict[str, Any]:
    """The K processes' policy params: told ``router_processes=K`` (what ``--workers K`` does) unless
    ``tell`` is off."""
    return {**params, "router_processes": k} if tell else dict(params)


def HEADERS(k: int) -> list[str]:  # noqa: N802 - a table header, named like the others
    return ["engine", "workload", "hit 1p", f"hit {k}p", "ratio", "ttft p90 1p", f"ttft p90 {k}p", "ratio",
            "goal met"]


if __name__ == "__main__":
    sys.exit(main())
