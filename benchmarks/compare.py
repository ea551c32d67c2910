"""Side by side: every routing policy of ours and other routers, on the same fleet and the same workloads.

    python -m benchmarks.compare                       # gsp and multiturn, 4 llmd-8b sim engines, c=16
    python -m benchmarks.compare --workloads agentic,trace --rates 2,4,8
    python -m benchmarks.compare --quick               # a small run (minutes)
    python -m benchmarks.compare --matrix              # issue 15's engine x workload matrix, offline (~1 min)
    python -m benchmarks.compare --profile unbatched --workloads agentic --quick   # one matrix cell, live
    python -m benchmarks.compare --quick --policies cost,precise --kv-fraction 0.4,0.6,1.0   # KV events (issue 14)
    python -m benchmarks.compare --quick --policies cost,precise --router-processes 1,4 --no-peers

For each workload and each contender (and each load point) it starts a fresh fleet of N sim engines
(cold caches, the same KV capacity for everyone), starts the contender's router in front of it by its
own command line, warms it up with a few short unrelated requests, replays the workload through it
with the load generator and stops everything. Contenders: our policies (`cost` is the default), the
other routers installed by the `bench` extra (`sglang-router`, `vllm-router`) with the policies they
are known for, and the oracle: the hit rate of one pooled prefix cache with the fleet's total
capacity (no routing can do better for the same capacity). A contender that fails to start is a row
with its error, never dropped.

With ``--engine-urls`` it points at replicas that already run (real vLLM servers, say) instead: their
caches cannot be reset between runs, so every run gets the same workload shape with its own text
(`workloads.reseed`), and no contender is served from blocks an earlier one left behind.

Each workload ends with PASS/FAIL acceptance lines per load point (`lib/acceptance.py`): the benchmarks
issue's (`cost`'s TTFT p90 vs the best other router, its hit rate vs the oracle) and, on gsp and
multiturn, the routing-quality lines that `benchmarks.quality` used to check (hit rate vs the oracle and
round robin, max/mean, multiturn hit rate vs `pinned`: consistent_hash keyed by the session header).

KV events (issue 14): when a contender prices them (`precise`, i.e. `cost` with ``index: precise``) or
follows them (``vllm-router:kv_aware``), every run's engines publish them (`fleet.kv_event_endpoints`), so
all contenders of a run face the same engines. ``--router-processes 1,4`` runs each of our contenders also
as K processes behind one port (``python -m router --workers K``; named ``<contender>@Kp``).
``--kv-fraction 0.4,0.6,1.0`` repeats every workload at those fleet KV capacities (times its prompt
footprint; overrides ``--capacity-factor``), to show where a cache that evicts separates the indexes.

Per-replica shares come from the engines' own counters (``vllm:request_success_total``), so routers
that do not say where they sent a request are measured the same way as ours. Output: a table, a JSON
file (`benchmarks/results/<name>.json`, with every router's exact command line) and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.lib.acceptance import DEFAULT, print_acceptance, quality_lines, verdict
from benchmarks.lib.cli_help import DefaultsHelpFormatter
from benchmarks.lib.client import client_session, engine_counters, warm_up
from benchmarks.lib.comma import comma_list, joined, positive_int
from benchmarks.lib.cpu import CpuWatch
from benchmarks.lib.defaults import MODEL, PROFILE_COST_PARAMS, RESULTS_DIR, SESSION_HEADER
from benchmarks.lib.fleet import EngineSpec, Fleet, inspect_replicas
from benchmarks.lib.loadgen import LoadSpec, run_workload
from benchmarks.lib.metrics import Slo, summarize_run
from benchmarks.lib.report import machine_info, run_benchmark
from benchmarks.lib.routers import (
    Contender,
    RouterStartError,
    our_contenders,
    peer_available,
    peer_contenders,
    peer_version,
    run_router,
)
from benchmarks.lib.workloads import NAMES, Workload, build, kv_blocks_per_replica, oracle, reseed


def contenders(args: argparse.Namespace) -> list[Contender]:
    """Our policies (plus `cost-pinned` and `cost-online`, the calibration modes the default does not
    use, `cost-tuned` where the profile has documented ratios, and `pinned`), then the peers."""
    ours = our_contenders()
    ours.append(Contender("cost-pinned", "ours", "cost", {"calibration": "pinned"}))  # issue 15 variants
    ours.append(Contender("cost-online", "ours", "cost", {"calibration": "online"}))
    if tuned := PROFILE_COST_PARAMS.get(args.profile):
        ours.append(Contender("cost-tuned", "ours", "cost", dict(tuned)))
    ours.append(Contender("pinned", "ours", "consistent_hash", session_header=SESSION_HEADER,
                          notes="consistent_hash keyed by the session header: every session stays on one replica"))
    if args.policies:
        keep = args.policies
        unknown = set(keep) - {c.name for c in ours}
        if unknown:
            raise SystemExit(f"--policies: unknown {sorted(unknown)}; choose from {[c.name for c in ours]}")
        ours = [c for c in ours if c.name in keep]
    ours = [dataclasses.replace(c, name=c.name if k == 1 else f"{c.name}@{k}p", workers=k,
                                params=untold(c, k) if args.untold_processes else c.params)
            for k in args.router_processes for c in ours]
    peers = [] if args.no_peers else peer_contenders()
    if args.peers:
        keep = args.peers
        unknown = set(keep) - {p.name for p in peers} - {p.kind for p in peers}
        if unknown:
            raise SystemExit(f"--peers: unknown {sorted(unknown)}; choose from {[p.name for p in peers]} or a kind")
        peers = [p for p in peers if p.name in keep or p.kind in keep]
    return ours + peers


def untold(c: Contender, k: int) -> dict[str, Any]:
    """``--untold-processes``: K cost-family processes priced as one lone router would (``router_processes:
    1``), as before ``--workers K`` told each worker its count: the "before" of the agreement's effect."""
    if k == 1 or c.policy not in ("cost", "precise"):
        return c.params
    return {**c.params, "router_processes": 1}


# -- one run ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engines(args: argparse.Namespace, kv_blocks: int, log_dir: Path) -> AsyncIterator[list[str]]:
    """A fresh fleet of sim engines for one run, or the replicas given by ``--engine-urls``."""
    if args.engine_urls:
        yield args.engine_urls
        return
    engine = EngineSpec(profile=args.profile, time_scale=args.time_scale, num_blocks=kv_blocks, seed=args.seed,
                        kv_events=getattr(args, "kv_events", False))
    async with Fleet(args.engines, engine, router=None, log_dir=log_dir) as fleet:
        yield fleet.engine_urls


async def run_one(contender: Contender, workload: Workload, spec: LoadSpec, args: argparse.Namespace,
                  kv_blocks: int, log_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"contender": contender.name, "kind": contender.kind, "policy": contender.policy,
                           "params": contender.params, "notes": contender.notes,
                           "load": spec.label(), "load_value": spec.load, "mode": spec.mode}
    if contender.session_header:  # `pinned`: the load generator names each request's session
        spec = dataclasses.replace(spec, session_header=contender.session_header)
    t0 = time.monotonic()
    async with engines(args, kv_blocks, log_dir) as urls:
        try:
            async with run_router(contender, urls, log_dir, model=args.model) as router:
                row.update(argv=router.argv, version=router.version)
                warm_errors = await warm_up(router.url, args.warmup, args.model)
                async with client_session() as s:
                    before = await engine_counters(s, urls)
                    pids = [router.pid, *_children(router.pid)]  # --workers K: the K workers do the work
                    watch = CpuWatch(pids).start()
                    run = await run_workload(router.url, workload, spec, model=args.model, progress=args.progress,
                                             description=f"{workload.name} {contender.name} {spec.label()}")
                    watch.stop()
                    after = await engine_counters(s, urls)
        except RouterStartError as exc:
            row["error"] = str(exc)
            print(f"  {contender.name:28s} FAILED TO START: {str(exc).splitlines()[0]}", flush=True)
            return row
    served = {f"r{i}": a["request_success"] - b["request_success"] for i, (a, b) in enumerate(zip(after, before,
                                                                                                 strict=True))}
    queries = sum(a["prefix_cache_queries"] - b["prefix_cache_queries"] for a, b in zip(after, before, strict=True))
    hits = sum(a["prefix_cache_hits"] - b["prefix_cache_hits"] for a, b in zip(after, before, strict=True))
    summary = summarize_run(run.records, run.wall_s, Slo(args.slo_ttft_s, args.slo_tpot_s), per_replica=served)
    summary["engine_hit_rate"] = round(hits / queries, 4) if queries else math.nan
    ok = max(1, summary["ok"])
    row.update(summary=summary, stopped_by=run.stopped_by, warmup_errors=warm_errors[:3],
               router_cpu_s_per_1k=round(sum(watch.used[:-1]) / ok * 1000, 3) if watch.used else math.nan,
               other_cpu_share=round(watch.other_share, 3), run_s=round(time.monotonic() - t0, 1))
    s = summary
    print(f"  {contender.name:28s} {spec.label():7s} TTFT p90 {s['ttft_ms']['p90']:8.1f} ms  hit {s['hit_rate']:.3f}"
          f"  max/mean {s['max_over_mean']:.2f}  {s['req_per_s']:.2f} req/s  failed {s['failed']}"
          f"  ({row['run_s']:.0f}s)", flush=True)
    return row


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except (ImportError, OSError):
        return []


def load_specs(args: argparse.Namespace, workload: Workload) -> list[LoadSpec]:
    common = {"max_requests": args.requests, "max_s": args.max_s, "seed": args.seed,
              "fresh_connections": args.fresh_connections}
    if workload.sessions and workload.sessions[0].at_s is not None and not args.rates and args.trace_timing:
        return [LoadSpec(rate=0, **common)]
    if args.rates:
        return [LoadSpec(rate=r, **common) for r in args.rates]
    return [LoadSpec(concurrency=int(c), **common) for c in args.concurrency]


async def bench_workload(workload: Workload, args: argparse.Namespace, cands: Sequence[Contender],
                         log_root: Path) -> dict[str, Any]:
    kv = args.kv_blocks or args.external_kv_blocks or kv_blocks_per_replica(workload, args.engines,
                                                                               args.capacity_factor)
    bound = oracle(workload, kv * args.engines)
    fleet = f"{args.engines} given replicas" if args.engine_urls else f"{args.engines} x {args.profile} engines"
    print(f"\n{workload.describe()}\n  {fleet}, {kv} KV blocks each; "
          f"oracle hit rate {bound.hit_rate:.3f} (footprint {bound.unique_blocks} blocks)", flush=True)
    rows = []
    if all(len(s.turns) == 1 for s in workload.sessions):  # no session to keep together: pinned is random
        cands = [c for c in cands if not c.session_header]
    for spec in load_specs(args, workload):
        for c in cands:
            log_dir = log_root / workload.name / c.name.replace(":", "-") / spec.label().replace("/", "per")
            log_dir.mkdir(parents=True, exist_ok=True)
            run_wl, run_bound = workload, bound
            if args.engine_urls:  # caches persist between runs: same shape, text nobody has sent yet
                run_wl = reseed(workload, args.seed + 1 + len(rows))
                run_bound = oracle(run_wl, kv * args.engines)
            rows.append(await run_one(c, run_wl, spec, args, kv, log_dir))
            rows[-1]["oracle_hit_rate"] = round(run_bound.hit_rate, 4)
            rows[-1]["workload_seed"] = run_wl.params.get("seed")
    for r in rows:
        if "summary" in r:
            o = r["oracle_hit_rate"]
            r["hit_vs_oracle"] = round(r["summary"]["hit_rate"] / o, 3) if o else math.nan
    return {"workload": workload.name, "params": workload.params, "requests": workload.num_requests,
            "kv_blocks_per_replica": kv, "capacity_factor": args.capacity_factor, "engines": args.engines,
            "oracle": {"hit_rate": round(bound.hit_rate, 4), "capacity_blocks": bound.capacity_blocks,
                       "footprint_blocks": bound.unique_blocks,
                       "definition": "one LRU prefix cache with the fleet's total KV blocks, requests in order"},
            "rows": rows, "verdict": verdict(rows, bound.hit_rate), "acceptance": quality_lines(workload.name, rows)}


# -- output ---------------------------------------------------------------------------------------------


COLUMNS = ("contender", "load", "TTFT p50", "p90", "p99", "TPOT p50", "E2E p90", "req/s", "tok/s", "goodput",
           "hit", "vs oracle", "max/mean", "failed", "429/503", "CPU s/1k")


def table_rows(res: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for r in res["rows"]:
        if "summary" not in r:
            rows.append([r["contender"], r["load"], "failed to start: " + r["error"].splitlines()[0][:60],
                         *[""] * (len(COLUMNS) - 3)])
            continue
        s = r["summary"]
        rows.append([r["contender"], r["load"], s["ttft_ms"]["p50"], s["ttft_ms"]["p90"], s["ttft_ms"]["p99"],
                     s["tpot_ms"]["p50"], s["e2e_ms"]["p90"], s["req_per_s"], s["output_tok_per_s"],
                     s["goodput_req_per_s"], s["hit_rate"], r.get("hit_vs_oracle", math.nan), s["max_over_mean"],
                     s["failed"], f"{s['status_429']}/{s['status_503']}", r["router_cpu_s_per_1k"]])
    rows.append(["oracle", "", "", "", "", "", "", "", "", "", res["oracle"]["hit_rate"], 1.0, "", "", "", ""])
    return rows


def print_result(res: dict[str, Any]) -> None:
    title = (f"{res['workload']}: {res['requests']} requests, {res['engines']} engines x "
             f"{res['kv_blocks_per_replica']} KV blocks (fleet = {res.get('capacity_factor', math.nan):g} x "
             f"footprint; ms; hit = cached / prompt tokens)")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the bench extra is not installed: plain text
        from benchmarks.lib.report import format_table

        print(f"\n{title}\n" + format_table(COLUMNS, table_rows(res)))
    else:
        t = Table(title=title, title_justify="left")
        for i, c in enumerate(COLUMNS):
            t.add_column(c, justify="left" if i < 2 else "right", no_wrap=i == 0)
        for row in table_rows(res):
            t.add_row(*(_cell(x) for x in row), style="bold" if row[0] == DEFAULT else None)
        Console(width=max(160, Console().width)).print(t)
    print_acceptance(res)


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:.0f}"
    return str(x)


# -- command line ---------------------------------------------------------------------------------------


def _url(text: str) -> str:
    return text.rstrip("/")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; the comma-list flags (`COMMA_FLAGS`, and ``--engine-urls``) come back as lists."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--workloads", type=comma_list(choices=NAMES), default="gsp,multiturn",
                   help=f"comma list of {', '.join(NAMES)}")
    p.add_argument("--full", action="store_true", help="the literature's workload sizes (slow on 2 cores)")
    p.add_argument("--trace", type=Path, help="JSONL trace for the trace workload (default: the bundled sample)")
    p.add_argument("--trace-timing", action=argparse.BooleanOptionalAction, default=True,
                   help="replay trace workloads at their own timestamps unless --rates is given")
    p.add_argument("--engines", type=int, default=4, help="sim engines in the fleet")
    p.add_argument("--engine-urls", type=comma_list(_url),
                   help="comma list of running OpenAI engine servers to use instead of sim engines (caches are "
                        "not reset: each run gets its own workload text)")
    p.add_argument("--model", help="model name to request (default: the sim's, or the first --engine-urls "
                                   "server's /v1/models)")
    p.add_argument("--profile", default="llmd-8b", help="sim timing profile of the engines")
    p.add_argument("--time-scale", type=float, default=1.0, help="sim time scale (1.0: real time)")
    p.add_argument("--kv-blocks", type=int, help="KV blocks per engine (default: capacity-factor x footprint / N)")
    p.add_argument("--capacity-factor", type=float, default=1.3,
                   help="fleet KV capacity as a multiple of the workload's prompt footprint")
    p.add_argument("--kv-fraction", type=comma_list(float, allow_empty=True),
                   help="comma list of fleet KV capacities as multiples of the footprint: every workload runs at "
                        "each (a cache-size sweep; overrides --capacity-factor)")
    p.add_argument("--router-processes", type=comma_list(positive_int), default="1",
                   help="comma list: our contenders also run as K router processes on one port (--workers K)")
    p.add_argument("--untold-processes", action="store_true",
                   help="our cost/precise contenders at K processes price as a lone router (router_processes=1) "
                        "instead of being told K by --workers K (router.policies.placement): the 'before'")
    p.add_argument("--concurrency", type=comma_list(float), default="16",
                   help="comma ladder of client counts (closed loop)")
    p.add_argument("--rates", type=comma_list(float, allow_empty=True),
                   help="comma ladder of Poisson session rates per second (open loop; overrides --concurrency)")
    p.add_argument("--requests", type=int, default=10_000, help="cap on requests per run")
    p.add_argument("--max-s", type=float, default=180.0, help="no new request after this many seconds of a run")
    p.add_argument("--warmup", type=int, default=8, help="short unrelated requests before each run")
    p.add_argument("--policies", type=comma_list(allow_empty=True),
                   help="comma list of our contenders (default: every policy, plus cost-tuned)")
    p.add_argument("--peers", type=comma_list(allow_empty=True),
                   help="comma list of peer contenders or kinds (default: all installed)")
    p.add_argument("--no-peers", action="store_true", help="only our policies")
    p.add_argument("--fresh-connections", action="store_true",
                   help="one TCP connection per request (default: keep-alive, as SDK clients pool them; "
                        "sglang-router stalls ~40 ms per streamed answer on reused connections)")
    p.add_argument("--slo-ttft-s", type=float, default=2.0, help="goodput SLO on TTFT")
    p.add_argument("--slo-tpot-s", type=float, default=0.1, help="goodput SLO on time per output token")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    p.add_argument("--quick", action="store_true", help="smaller workloads: gsp 8x8, multiturn 8x6, ...")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="workload parameter, e.g. --set groups=4 --set system_tokens=256 (applies to every "
                        "workload that has it; see benchmarks/lib/workloads.py)")
    p.add_argument("--matrix", action="store_true",
                   help="run the calibration matrix (benchmarks.matrix: every sim engine profile x workload, "
                        "in the offline simulator) instead; a cell runs live with --profile and --workloads")
    p.add_argument("--name", default="compare", help="results/<name>.json and results/<name>-<workload>.png")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and plots go")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.add_argument("--log-dir", type=Path, help="keep engine and router logs here (default: a temp dir)")
    args = p.parse_args(argv)
    args.engine_urls = args.engine_urls or None
    if args.engine_urls:
        args.engines = len(args.engine_urls)
    args.external_kv_blocks = None
    return args


COMMA_FLAGS = ("workloads", "kv_fraction", "router_processes", "concurrency", "rates", "policies", "peers")


def recorded_args(args: argparse.Namespace) -> dict[str, str]:
    """The arguments as the results JSON records them: text, the comma-list flags as they were given."""
    return {k: joined(v) if k in COMMA_FLAGS and v is not None else str(v) for k, v in vars(args).items()}


QUICK: dict[str, dict[str, Any]] = {
    "gsp": {"groups": 8, "questions": 8}, "multiturn": {"conversations": 8, "turns": 6},
    "agentic": {"sessions": 12, "steps": 3}, "prefix-sweep": {"requests": 32, "ratios": (0.1, 0.5, 0.9)},
    "trace": {"limit": 60},
}


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set groups=4 --set ratios=0.2,0.8``: numbers become numbers, comma lists tuples of numbers."""
    def number(v: str) -> Any:
        try:
            return int(v)
        except ValueError:
            return float(v)

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        try:
            out[key.strip()] = tuple(number(v) for v in value.split(",")) if "," in value else number(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: VALUE must be a number or a comma list of numbers") from None
    return out


def workloads_for(args: argparse.Namespace) -> list[Workload]:
    """The workloads named on the command line, with --quick sizes and --set overrides where they apply."""
    import inspect

    from benchmarks.lib.workloads import GENERATORS

    sets = parse_sets(args.set or [])
    out: list[Workload] = []
    for name in args.workloads:
        accepted = set(inspect.signature(GENERATORS[name]).parameters) | {"ratios"} if name in GENERATORS else set()
        overrides = {**(QUICK.get(name, {}) if args.quick else {}),
                     **{k: v for k, v in sets.items() if k in accepted}}
        out += build(name, seed=args.seed, full=args.full, trace_path=args.trace, **overrides)
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    if args.engine_urls:
        args.model, args.external_kv_blocks = await inspect_replicas(args.engine_urls, args.model)
        if args.kv_blocks is None and args.external_kv_blocks is None:
            print("note: KV size unknown (no /load): the oracle assumes --capacity-factor x the footprint; "
                  "give --kv-blocks for a true bound")
    args.model = args.model or MODEL
    cands = contenders(args)
    args.kv_events = any(c.needs_kv_events for c in cands)  # the same engines for every contender of a run
    unavailable = {k: why for k in ("sglang-router", "vllm-router") if (why := peer_available(k))}
    for kind, why in unavailable.items():
        print(f"note: {kind} unavailable: {why}")
    out: dict[str, Any] = {
        "benchmark": "compare", "machine": machine_info(), "args": recorded_args(args),
        "peers": {k: {"version": peer_version(k), "unavailable": unavailable.get(k)}
                  for k in ("sglang-router", "vllm-router")},
        "contenders": [{"name": c.name, "kind": c.kind, "policy": c.policy, "params": c.params} for c in cands],
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        log_root = args.log_dir or Path(tmp)
        fractions = args.kv_fraction or [None]
        for wl in workloads_for(args):
            for fraction in fractions:
                if fraction is not None:
                    args.capacity_factor = fraction
                suffix = "" if fraction is None else f"-kv{fraction:g}"
                res = await bench_workload(wl, args, cands, log_root / f"kv{fraction:g}" if suffix else log_root)
                out["results"].append(res)
                print_result(res)
                if not args.no_plots:
                    try:
                        from benchmarks.lib.plots import plot_compare

                        res["plot"] = str(plot_compare(res, args.out_dir / f"{args.name}-{wl.name}{suffix}.png"))
                        print(f"  plot: {res['plot']}")
                    except ImportError as exc:
                        print(f"  no plot ({exc}); install the bench extra")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.matrix:  # too heavy to run live on a small machine: the same policy objects in virtual time
        from benchmarks.matrix import main as matrix_main

        return matrix_main(["--plot", "--poisson", "0.5,0.75,0.9", "--seed", str(args.seed or 1)])
    return run_benchmark(lambda: amain(args), args.out_dir / f"{args.name}.json")


if __name__ == "__main__":
    raise SystemExit(main())
