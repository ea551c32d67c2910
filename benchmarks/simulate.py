"""Offline discrete-event fleet simulator: the router's policies over the sim engine model, in virtual time.

    python -m benchmarks.simulate --workload gsp --replicas 4                 # every policy, small fleet
    python -m benchmarks.simulate --workload gsp --replicas 4 --against-live  # + the same run over HTTP
    python -m benchmarks.simulate --scale --replicas 1000 --requests 20000 --policies round_robin
    python -m benchmarks.simulate --scale --engine fast --replicas 1000 --requests 1000000 --policies round_robin

Why: the live benchmark runs the real router and real sim engine servers, so it is faithful but bound to
what two cores can serve (a handful of replicas, a few hundred requests). The simulator drives the SAME
objects without HTTP or asyncio: the router's routing step (`router.routing`) over real `ReplicaState`s,
and the sim engine's `Scheduler` (or its fast model, `engine_server.sim.fast`) per replica.

This module is the command line (and ``--against-live``); the pieces are:

- `benchmarks.sim_loop`: the event loop, `simulate()` and `SimRun`;
- `benchmarks.sim_engines`: prompts as the engine sees them and the two engine models;
- `benchmarks.sim_workload`: the lazily built fleet-scale workload of ``--scale``.

Load follows `benchmarks.lib.loadgen` exactly, and every request yields a `RequestRecord`, so
`benchmarks.lib.metrics.summarize_run` reads simulated and live runs alike. See docs/simulator.md for what is
and is not modelled and how well it agrees with the live benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.lib import workloads as wl
from benchmarks.lib.cli_help import DefaultsHelpFormatter
from benchmarks.lib.comma import comma_list
from benchmarks.lib.defaults import PROFILE_COST_PARAMS, RESULTS_DIR
from benchmarks.lib.loadgen import LoadSpec
from benchmarks.lib.metrics import summarize_run
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.sim_engines import ENGINES, PromptEncoder
from benchmarks.sim_loop import DEFAULT_POLL_S, DEFAULT_STALE_S, SimRun, simulate
from benchmarks.sim_profile import sample_cpu
from benchmarks.sim_workload import scale_workload
from engine_server.sim.timing import PROFILES, get_profile
from router.policies import POLICY_NAMES

__all__ = ["PROFILE_COST_PARAMS", "PromptEncoder", "SimRun", "main", "scale_workload", "simulate"]

# Agreement tolerance of --against-live (docs/simulator.md explains the choice).
TOL_HIT_ABS = 0.05
TOL_TTFT_REL = 0.25
TOL_THROUGHPUT_REL = 0.15


# -- the command line ---------------------------------------------------------------------------------


def policy_params(name: str, profile: str) -> dict[str, Any]:
    """What the live benchmarks run: `cost` with the profile's time constants, the others with defaults."""
    return dict(PROFILE_COST_PARAMS.get(profile, {})) if name == "cost" else {}


def build_workload(args: argparse.Namespace) -> wl.Workload:
    if args.scale:
        return scale_workload(args.requests or 100_000, args.replicas, seed=args.seed)
    built = wl.build(args.workload, seed=args.seed, full=args.full, trace_path=args.trace)
    if len(built) > 1:  # prefix-sweep: one ratio per run keeps the table readable
        built = [w for w in built if w.params.get("ratio") == args.ratio] or built[:1]
    return built[0]


def load_spec(args: argparse.Namespace, workload: wl.Workload) -> LoadSpec:
    max_requests = args.requests or workload.num_requests
    if args.rate is not None:
        return LoadSpec(rate=args.rate, max_requests=max_requests, max_s=args.max_s, seed=args.seed)
    if args.workload == "trace" and args.concurrency is None and not args.scale:
        return LoadSpec(rate=0, max_requests=max_requests, max_s=args.max_s, seed=args.seed)
    conc = args.concurrency or (4 * args.replicas if args.scale else 16)
    return LoadSpec(concurrency=conc, max_requests=max_requests, max_s=args.max_s, seed=args.seed)


def row_of(label: str, s: dict[str, Any]) -> list[Any]:
    return [label, s["requests"], s["failed"], s["hit_rate"], s["ttft_ms"]["p50"], s["ttft_ms"]["p90"],
            s["e2e_ms"]["p50"], s["req_per_s"], s["max_over_mean"], s["wall_s"]]


HEADERS = ["run", "requests", "failed", "hit", "ttft p50 ms", "ttft p90 ms", "e2e p50 ms", "req/s", "max/mean",
           "wall s"]


def compare(sim: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Sim vs live on the agreement metrics, each with its error and verdict against the tolerance."""
    def rel(a: float, b: float) -> float:
        return (a - b) / b if b else math.nan

    out: dict[str, Any] = {}
    hit_err = sim["hit_rate"] - live["hit_rate"]
    out["hit_rate"] = {"sim": sim["hit_rate"], "live": live["hit_rate"], "abs_err": round(hit_err, 4),
                       "tolerance": f"+-{TOL_HIT_ABS} abs", "pass": abs(hit_err) <= TOL_HIT_ABS}
    for q in ("p50", "p90"):
        e = rel(sim["ttft_ms"][q], live["ttft_ms"][q])
        out[f"ttft_{q}_ms"] = {"sim": sim["ttft_ms"][q], "live": live["ttft_ms"][q], "rel_err": round(e, 4),
                               "tolerance": f"+-{TOL_TTFT_REL:.0%}", "pass": abs(e) <= TOL_TTFT_REL}
    e = rel(sim["req_per_s"], live["req_per_s"])
    out["req_per_s"] = {"sim": sim["req_per_s"], "live": live["req_per_s"], "rel_err": round(e, 4),
                        "tolerance": f"+-{TOL_THROUGHPUT_REL:.0%}", "pass": abs(e) <= TOL_THROUGHPUT_REL}
    out["max_over_mean"] = {"sim": sim["max_over_mean"], "live": live["max_over_mean"],
                            "abs_err": round(sim["max_over_mean"] - live["max_over_mean"], 3),
                            "tolerance": "reported only", "pass": True}
    return out


async def run_live(workload: wl.Workload, policy: str, params: dict[str, Any], args: argparse.Namespace,
                   spec: LoadSpec, kv_blocks: int) -> dict[str, Any]:
    """The same workload over HTTP: 4 sim engine subprocesses (time scale 1) and the router."""
    from benchmarks.lib.fleet import EngineSpec, Fleet, RouterSpec
    from benchmarks.lib.loadgen import run_workload

    engine = EngineSpec(profile=args.profile, num_blocks=kv_blocks)
    router = RouterSpec(policy=policy, params=params, load_poll_s=args.poll_interval_s)
    async with Fleet(args.replicas, engine, router) as fleet:
        assert fleet.router_url is not None
        res = await run_workload(fleet.router_url, workload, spec, progress=False)
    served = Counter(r.replica for r in res.records if r.ok and r.replica)
    per_replica = {f"r{i}": served.get(f"r{i}", 0) for i in range(args.replicas)}  # zeros count in max/mean
    return summarize_run(res.records, res.wall_s, per_replica=per_replica)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.simulate",
        description="Offline discrete-event fleet simulator: the router's policies on the sim engine's "
                    "scheduler and prefix cache, in virtual time (no HTTP). Prints one row per policy and "
                    "writes benchmarks/results/simulate-<workload>.json.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--workload", choices=wl.NAMES, default="gsp",
                   help="workload generator from benchmarks.lib.workloads (ignored with --scale)")
    p.add_argument("--trace", type=Path, default=None, help="JSONL trace for --workload trace (default: sample)")
    p.add_argument("--ratio", type=float, default=0.5, help="shared-prefix ratio for --workload prefix-sweep")
    p.add_argument("--full", action="store_true", help="the workload's literature-sized variant")
    p.add_argument("--replicas", type=int, default=4, help="simulated engine replicas")
    p.add_argument("--policies", type=comma_list(choices=POLICY_NAMES), default=",".join(POLICY_NAMES),
                   help="comma-separated router policies; cost gets the profile's time constants")
    p.add_argument("--profile", choices=sorted(PROFILES), default="llmd-8b", help="sim engine timing profile")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per replica (default: workloads.kv_blocks_per_replica, i.e. 1.3x the "
                        "workload's footprint over the fleet; with --scale the profile's own)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed-loop clients, each running sessions back to back (default 16; with "
                           "--scale 4 per replica)")
    load.add_argument("--rate", type=float, default=None,
                      help="Poisson session arrivals per (virtual) second; 0 replays trace timestamps")
    p.add_argument("--requests", type=int, default=None,
                   help="stop after this many requests (default: the whole workload; with --scale, also "
                        "the generated workload's size, 100000)")
    p.add_argument("--max-s", type=float, default=3600.0, help="no request starts after this many virtual s")
    p.add_argument("--seed", type=int, default=1, help="workload, arrivals and policy tie-break seed")
    p.add_argument("--scale", action="store_true",
                   help="generate a fleet-sized gsp workload (16 groups per replica, 512-token system "
                        "prompts, 64-token questions, 32 output tokens) and skip per-token gaps")
    p.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_S,
                   help="how often the router reads each replica's /load (views carry its age)")
    p.add_argument("--stale-after-s", type=float, default=DEFAULT_STALE_S,
                   help="load reports older than this read as missing, as in the router")
    p.add_argument("--engine", choices=ENGINES, default="exact",
                   help="exact: step the sim engine's Scheduler per token; fast: engine_server.sim.fast's "
                        "model (same batching and prefix cache, decode windows in one event; ~10x+ faster)")
    p.add_argument("--router-processes", type=int, default=1,
                   help="K independent router processes, requests spread over them at random "
                        "(benchmarks.sim_processes; K vs 1 over engines: python -m benchmarks.processes)")
    p.add_argument("--kv-events", action="store_true",
                   help="the engines' KV events reach the policies (exact engine; without them precise and cost's "
                        "index option price the router's own guess)")
    p.add_argument("--exact-tokens", action="store_true",
                   help="generate output tokens with the engine's own stream (slower; same metrics)")
    p.add_argument("--against-live", action="store_true",
                   help=f"also run the same workload live ({'{replicas}'} sim engine subprocesses + router, "
                        "time scale 1) and print sim vs live with PASS/FAIL against the tolerance")
    p.add_argument("--profile-cpu", action="store_true", help="run under cProfile and print the top functions")
    p.add_argument("--sample-cpu", action="store_true",
                   help="sample the stack every 2 ms of CPU time and print each function's share (far less "
                        "overhead and distortion than --profile-cpu; benchmarks.sim_profile)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policies = args.policies  # names checked by the parser: a typo fails before any work
    t0 = time.perf_counter()
    workload = build_workload(args)
    build_s = time.perf_counter() - t0
    if args.kv_blocks is not None:
        kv = args.kv_blocks
    elif args.scale:
        kv = get_profile(args.profile).num_blocks
    else:
        kv = wl.kv_blocks_per_replica(workload, args.replicas)
    spec = load_spec(args, workload)
    print(f"{workload.describe()}\n{args.replicas} replicas, {args.engine} engine, profile {args.profile}, "
          f"{kv} KV blocks each, "
          f"load {spec.label()}, workload built in {build_s:.1f} s", flush=True)
    out: dict[str, Any] = {"machine": machine_info(), "workload": workload.name, "params": workload.params,
                           "replicas": args.replicas, "engine": args.engine, "profile": args.profile,
                           "kv_blocks": kv,
                           "load": spec.label(), "poll_interval_s": args.poll_interval_s,
                           "tolerance": {"hit_abs": TOL_HIT_ABS, "ttft_rel": TOL_TTFT_REL,
                                         "req_per_s_rel": TOL_THROUGHPUT_REL},
                           "runs": {}}
    if not args.scale:
        out["oracle_hit_rate"] = round(wl.oracle(workload, kv * args.replicas).hit_rate, 4)
    rows = []
    perf_rows = []
    for name in policies:
        params = policy_params(name, args.profile)
        kwargs: dict[str, Any] = dict(profile=args.profile, num_blocks=kv, load=spec,
                                      poll_interval_s=args.poll_interval_s, stale_after_s=args.stale_after_s,
                                      seed=args.seed, keep_itl=not args.scale, exact_tokens=args.exact_tokens,
                                      engine=args.engine)
        if args.router_processes != 1 or args.kv_events:
            kwargs.update(router_processes=args.router_processes, kv_events=args.kv_events)
        if args.profile_cpu:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            run = prof.runcall(simulate, workload, args.replicas, name, params, **kwargs)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        elif args.sample_cpu:
            run, samples = sample_cpu(simulate, workload, args.replicas, name, params, **kwargs)
            print(samples.report(), flush=True)
        else:
            run = simulate(workload, args.replicas, name, params, **kwargs)
        s = run.summary()
        entry: dict[str, Any] = {"params": params, "sim": s, "stopped_by": run.stopped_by}
        rows.append(row_of(f"{name} sim", s))
        perf_rows.append([name, len(run.records), round(run.real_s, 2), s["sim"]["requests_per_real_s"],
                          s["sim"]["requests_per_cpu_s"], run.steps, run.events, round(run.wall_s, 1)])
        if args.against_live:
            live = asyncio.run(run_live(workload, name, params, args, spec, kv))
            entry["live"] = live
            entry["agreement"] = compare(s, live)
            rows.append(row_of(f"{name} live", live))
        out["runs"][name] = entry
        print(format_table(HEADERS, rows[-2 if args.against_live else -1:]), flush=True)
    print()
    print(format_table(HEADERS, rows))
    if "oracle_hit_rate" in out:
        print(f"pooled-cache bound (workloads.oracle, {kv * args.replicas} blocks): {out['oracle_hit_rate']}")
    print()
    print(format_table(["policy", "requests", "real s", "req/real s", "req/cpu s", "engine steps", "events",
                        "virtual s"],
                       perf_rows))
    failed = 0
    if args.against_live:
        print(f"\nsim vs live (tolerance: hit rate +-{TOL_HIT_ABS:.2f} abs, TTFT p50/p90 +-{TOL_TTFT_REL:.0%}, "
              f"req/s +-{TOL_THROUGHPUT_REL:.0%})")
        arows = []
        for name, entry in out["runs"].items():
            for metric, a in entry["agreement"].items():
                err = a.get("abs_err", a.get("rel_err"))
                verdict = "PASS" if a["pass"] else "FAIL"
                failed += not a["pass"]
                arows.append([name, metric, a["sim"], a["live"], err, a["tolerance"],
                              verdict if a["tolerance"] != "reported only" else "-"])
        print(format_table(["policy", "metric", "sim", "live", "error", "tolerance", "verdict"], arows))
    out["machine"]["loadavg_1m_at_end"] = round(__import__("os").getloadavg()[0], 2)
    suffix = "-fast" if args.engine == "fast" else ""
    path = args.out or RESULTS_DIR / f"simulate-{workload.name}{suffix}.json"
    write_json(path, out)
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
