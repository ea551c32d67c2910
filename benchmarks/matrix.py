"""The calibration matrix (issue 15): the default policy on engines nobody tuned it for, in virtual time.

    python -m benchmarks.matrix                    # every engine x workload cell, offline simulator
    python -m benchmarks.matrix --engines tiny-seqs,hetero --workloads agentic
    python -m benchmarks.matrix --poisson 0.5,0.75,0.9   # + Poisson arrivals at 50/75/90 % of saturation
    python -m benchmarks.compare --matrix          # all of it, with the plot (compare delegates here)

Each cell is a fleet of 4 simulated engines (`benchmarks.simulate`, the very scheduler and prefix cache
the sim engine server steps) and one workload; every contender runs it from a cold start: `cost` as the
router starts it (no parameters: the H100 defaults, `calibration: relative`), `cost-pinned` (learning
nothing), `cost-online` (every fitted constant, `router.calibration`) and our other policies (`cache_aware` is the
SGLang / vllm-router algorithm; the peer routers themselves only run live, see benchmarks/README.md).

Engines (`engine_server.sim.timing` profiles; the cost model's defaults are an H100 fit):
    llmd-8b       the project's usual benchmark engine
    slow-prefill  400 us per prefill token
    slow-decode   1.5 ms per running sequence per step
    tiny-seqs     4 running sequences at most
    small-kv      llmd-8b with a fleet cache of 0.6x the workload's footprint (evicts)
    unbatched     8 ms per running sequence, 8 at most (CPU-like)
    hetero        3 x llmd-8b + 1 llmd-8b twice as slow

Goals per cell (issue 15): cost TTFT p90 <= 0.8x the best other contender's, throughput >= 1.0x, hit
rate >= 0.9x the oracle, max/mean <= 1.3. Writes benchmarks/results/matrix.json and prints the table.
``--plot`` also writes the convergence plot (learned constants vs observations, per engine).
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.lib import workloads as wl
from benchmarks.lib.comma import comma_list
from benchmarks.lib.defaults import RESULTS_DIR
from benchmarks.lib.loadgen import LoadSpec
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.simulate import simulate
from engine_server.sim.timing import TimingProfile, get_profile, slowed
from router.calibration import NAMES as CONSTANTS
from router.policies import create_policy

ENGINES: dict[str, tuple[str, ...] | str] = {
    "llmd-8b": "llmd-8b", "slow-prefill": "slow-prefill", "slow-decode": "slow-decode",
    "tiny-seqs": "tiny-seqs", "small-kv": "llmd-8b", "unbatched": "unbatched",
    "hetero": ("llmd-8b", "llmd-8b", "llmd-8b", "llmd-8b-x2"),
}
CAPACITY = {"small-kv": 0.6}  # fleet KV as a multiple of the footprint; the rest use 1.3
WORKLOADS = ("gsp", "multiturn", "agentic", "prefix-sweep")
CONTENDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "cost": ("cost", {}), "cost-pinned": ("cost", {"calibration": "pinned"}),
    "cost-online": ("cost", {"calibration": "online"}),
    "round_robin": ("round_robin", {}), "least_load": ("least_load", {}),
    "power_of_two": ("power_of_two", {}), "consistent_hash": ("consistent_hash", {}),
    "cache_aware": ("cache_aware", {}),
}
REPLICAS = 4
GOALS = {"ttft_p90_vs_best": 0.8, "throughput_vs_best": 1.0, "hit_vs_oracle": 0.9, "max_over_mean": 1.3}


def profiles(engine: str) -> list[TimingProfile]:
    spec = ENGINES[engine]
    names = [spec] * REPLICAS if isinstance(spec, str) else list(spec)
    return [slowed(get_profile(n[:-3]), 2.0) if n.endswith("-x2") else get_profile(n) for n in names]


SIZED = {"gsp": "groups", "multiturn": "conversations", "agentic": "sessions",
         "prefix-sweep": "requests"}  # what a size > 1 multiplies


def workload_of(name: str, seed: int, size: int = 1) -> wl.Workload:
    """A matrix workload (prefix-sweep at ratio 0.5); ``size`` > 1 gives ``size`` x its sessions (more
    of the same shape: p90s of ~100 requests move with a handful of them)."""
    overrides: dict[str, Any] = {}
    if size > 1:
        field = SIZED[name]
        overrides[field] = inspect.signature(wl.GENERATORS[name]).parameters[field].default * size
    built = wl.build(name, seed=seed, **overrides)
    if name == "prefix-sweep":
        built = [w for w in built if w.params.get("ratio") == 0.5] or built[:1]
    return built[0]


def saturation_rate(engine: str, workload: wl.Workload, seed: int) -> float:
    """Sessions/s at which this fleet saturates: round_robin's throughput with 64 closed-loop clients,
    converted from requests to sessions."""
    kv = wl.kv_blocks_per_replica(workload, REPLICAS, CAPACITY.get(engine, 1.3))
    load = LoadSpec(concurrency=64, max_requests=workload.num_requests, seed=seed)
    s = simulate(workload, REPLICAS, "round_robin", profile=profiles(engine), num_blocks=kv, load=load,
                 seed=seed).summary()
    return s["req_per_s"] * len(workload.sessions) / workload.num_requests


def run_cell(engine: str, workload: wl.Workload, contenders: Sequence[str], seed: int,
             concurrency: int, rate: float | None = None, label: str | None = None) -> dict[str, Any]:
    """One engine x workload x load cell: every contender from a cold start, then the goal ratios.
    ``rate`` (Poisson sessions/s) replaces the ``concurrency`` closed-loop clients when given."""
    kv = wl.kv_blocks_per_replica(workload, REPLICAS, CAPACITY.get(engine, 1.3))
    oracle = wl.oracle(workload, kv * REPLICAS).hit_rate
    load = (LoadSpec(rate=rate, max_requests=workload.num_requests, seed=seed) if rate is not None else
            LoadSpec(concurrency=concurrency, max_requests=workload.num_requests, seed=seed))
    runs: dict[str, Any] = {}
    for name in contenders:
        policy, params = CONTENDERS[name]
        s = simulate(workload, REPLICAS, policy, params, profile=profiles(engine), num_blocks=kv, load=load,
                     seed=seed).summary()
        runs[name] = {"ttft_p90_ms": s["ttft_ms"]["p90"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                      "req_per_s": s["req_per_s"], "hit_rate": s["hit_rate"],
                      "max_over_mean": s["max_over_mean"], "failed": s["failed"]}
    cell: dict[str, Any] = {"engine": engine, "workload": workload.name, "load": label or load.label(),
                            "kv_blocks": kv,
                            "oracle_hit_rate": round(oracle, 4), "runs": runs}
    ours = runs.get("cost")
    others = {k: v for k, v in runs.items() if not k.startswith("cost")}
    if ours and others:
        best_ttft = min(others.items(), key=lambda kv_: kv_[1]["ttft_p90_ms"])
        best_tput = max(others.items(), key=lambda kv_: kv_[1]["req_per_s"])
        ratios = {"ttft_p90_vs_best": ours["ttft_p90_ms"] / best_ttft[1]["ttft_p90_ms"],
                  "throughput_vs_best": ours["req_per_s"] / best_tput[1]["req_per_s"],
                  "hit_vs_oracle": ours["hit_rate"] / oracle if oracle else math.nan,
                  "max_over_mean": ours["max_over_mean"]}
        cell.update(best_ttft=best_ttft[0], best_throughput=best_tput[0],
                    ratios={k: round(v, 3) for k, v in ratios.items()},
                    met={k: (v >= GOALS[k] if k in ("throughput_vs_best", "hit_vs_oracle") else v <= GOALS[k])
                         for k, v in ratios.items()})
        for variant in ("pinned", "online"):
            if f"cost-{variant}" in runs:
                cell[f"{variant}_ttft_p90_vs_best"] = round(
                    runs[f"cost-{variant}"]["ttft_p90_ms"] / best_ttft[1]["ttft_p90_ms"], 3)
    return cell


def convergence(engine: str, seed: int = 1) -> dict[str, Any]:
    """Learned constants of replica r0 after each of its requests (gsp, 1024 requests, so r0 sees
    about 250), against the profile's true values."""
    wload = wl.gsp(questions=64, seed=seed)
    kv = wl.kv_blocks_per_replica(wload, REPLICAS)
    policy = create_policy("cost", seed=seed, calibration="online")
    trace: list[dict[str, float]] = []
    complete = policy.on_complete

    def on_complete(features: Any, decision: Any, outcome: Any) -> None:
        complete(features, decision, outcome)
        if decision.replica == "r0":
            trace.append(policy.calibration("r0"))  # type: ignore[attr-defined]

    policy.on_complete = on_complete  # type: ignore[method-assign]
    load = LoadSpec(concurrency=16, max_requests=wload.num_requests, seed=seed)
    simulate(wload, REPLICAS, "cost", policy=policy, profile=profiles(engine), num_blocks=kv, load=load, seed=seed)
    return {"engine": engine, "true": profiles(engine)[0].cost_constants(), "trace": trace}


def plot_convergence(series: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CONSTANTS), figsize=(4.2 * len(CONSTANTS), 3.6))
    for ax, const in zip(axes, CONSTANTS, strict=True):
        for s in series:
            ys = [t[const] / s["true"][const] if s["true"][const] else math.nan for t in s["trace"]]
            ax.plot(range(1, len(ys) + 1), ys, label=s["engine"])
        ax.axhspan(0.8, 1.2, color="green", alpha=0.12)
        ax.axhline(1.0, color="green", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{const}: learned / true")
        ax.set_xlabel("requests completed on replica r0")
    axes[0].legend(fontsize=7)
    fig.suptitle("cost calibration (online) from the H100 prior, offline simulator, gsp 16x64, 4 replicas; "
                 "band: +-20 %")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(cells: Sequence[dict[str, Any]]) -> str:
    rows = []
    for c in cells:
        r, m, ours = c.get("ratios", {}), c.get("met", {}), c["runs"].get("cost", {})

        def flag(k: str, r: dict[str, float] = r, m: dict[str, bool] = m) -> str:
            return f"{r.get(k, math.nan):.2f}{'' if m.get(k) else ' x'}"

        rows.append([c["engine"], c["workload"], c.get("load", ""), ours.get("ttft_p90_ms"), flag("ttft_p90_vs_best"),
                     c.get("pinned_ttft_p90_vs_best", ""),
                     c.get("online_ttft_p90_vs_best", ""), c.get("best_ttft", ""), flag("throughput_vs_best"),
                     flag("hit_vs_oracle"), flag("max_over_mean")])
    return format_table(["engine", "workload", "load", "cost p90 ms", "p90 vs best", "pinned vs best", "online vs best", "best other",
                         "req/s vs best", "hit vs oracle", "max/mean"], rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=comma_list(choices=ENGINES), default=",".join(ENGINES),
                   help="comma list of " + ", ".join(ENGINES))
    p.add_argument("--workloads", type=comma_list(choices=wl.NAMES), default=",".join(WORKLOADS),
                   help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--contenders", type=comma_list(choices=CONTENDERS), default=",".join(CONTENDERS),
                   help="comma list of " + ", ".join(CONTENDERS))
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--poisson", type=comma_list(float, allow_empty=True), default="",
                   help="also Poisson session arrivals at these fractions of the fleet's saturation rate "
                        "(round_robin's throughput at 64 clients), e.g. 0.5,0.75,0.9")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plot", action="store_true", help="also the convergence plot (matrix-convergence.png)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "matrix.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engines, contenders = args.engines, args.contenders
    t0 = time.perf_counter()
    cells = []
    for name in args.workloads:
        workload = workload_of(name, args.seed)
        for engine in engines:
            cells.append(run_cell(engine, workload, contenders, args.seed, args.concurrency))
            print(table(cells[-1:]).splitlines()[-1], flush=True)
            if args.poisson:
                sat = saturation_rate(engine, workload, args.seed)
                for f in args.poisson:
                    cells.append(run_cell(engine, workload, contenders, args.seed, args.concurrency,
                                          rate=f * sat, label=f"p{round(100 * f)}"))
                    cells[-1]["rate_sessions_per_s"] = round(f * sat, 3)
                    print(table(cells[-1:]).splitlines()[-1], flush=True)
    out: dict[str, Any] = {"benchmark": "matrix", "machine": machine_info(), "goals": GOALS,
                           "replicas": REPLICAS, "concurrency": args.concurrency, "seed": args.seed,
                           "cells": cells, "real_s": round(time.perf_counter() - t0, 1)}
    if args.plot:
        series = [convergence(e, args.seed) for e in engines if e not in ("hetero", "small-kv")]
        out["convergence"] = [{"engine": s["engine"], "true": s["true"], "final": s["trace"][-1] if s["trace"] else None,
                               "requests": len(s["trace"]),
                               "at_200": s["trace"][199] if len(s["trace"]) > 199 else None} for s in series]
        out["plot"] = str(plot_convergence(series, args.out.with_name("matrix-convergence.png")))
    print()
    print(table(cells))
    write_json(args.out, out)
    print(f"\nwrote {args.out} ({out['real_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
