"""Router overhead side by side: what each router adds to streamed requests in front of zero-latency engines.

    python -m benchmarks.overhead            # ~5 min, writes results/overhead.json
    python -m benchmarks.overhead --quick    # 300 requests per level

Sim engines with the `instant` profile (no simulated compute) run as subprocesses; this process is the client
(aiohttp, uvloop). The contenders -- our router (policy `cost`), sglang-router and vllm-router (both
`round_robin`, so only the proxy path is compared) -- are all started in front of the same engines; at each
concurrency level they take turns: each gets an unmeasured warm-up, then `--requests` streamed chat requests of
16 tokens go straight to the engines ("direct", round robin) and then through that router. With `--rounds N`
the turns repeat N times and a level pools its rounds, so on a shared host every contender sees the same
disturbances. Reported per level: requests/s, TTFT and end-to-end p50/p99, "added" = router minus its direct
runs (a difference of percentiles), router CPU seconds per 1,000 requests (/proc of the router's pid), how busy
the whole host was, and errors. Client, engines and router share the machine's cores, so at high concurrency the numbers measure
CPU contention as much as the router. A peer that is not installed or fails to start gets a row with its error.
The client keeps connections alive (as SDK clients do); `--fresh-connections` opens one per request, which
shows stalls that only reused connections have (sglang-router: ~40 ms per streamed request at 1 stream).
`--interleave` takes turns request by request instead (request i goes to direct or to one router, in turn),
so a shared host's bursts fall on every contender alike (on a busy 2-core host, a change and its base
measured 0-28 % apart in CPU from one default run to the next; interleaved rounds agreed within +-5 %).
`--profile-router DIR` runs our router under cProfile on the process CPU clock (a shared host's waits do
not count) and writes `<contender>.pstats` there when it stops; the profiler inflates Python-heavy code, so
the CPU figures of that run are not comparable with an unprofiled one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks.lib.client import StreamResult, client_session, stream_chat
from benchmarks.lib.comma import comma_list
from benchmarks.lib.cpu import CpuWatch
from benchmarks.lib.defaults import MODEL, RESULTS_DIR
from benchmarks.lib.fleet import EngineSpec, Fleet
from benchmarks.lib.loadgen import closed_loop
from benchmarks.lib.report import format_table, install_uvloop, machine_info, write_json
from benchmarks.lib.routers import (
    Contender,
    RouterStartError,
    floor_contender,
    our_contenders,
    peer_available,
    peer_contender,
    peer_version,
    run_router,
    slug,
)
from benchmarks.lib.stats import summarize
from router.policies.registry import POLICY_NAMES

MAX_TOKENS = 16
# `python -c` bootstrap: our router's CLI under cProfile (process CPU clock), stats to argv[1] at exit
PROFILED_ROUTER = ("import atexit, cProfile, sys, time; out = sys.argv.pop(1); "
                   "prof = cProfile.Profile(time.process_time); "
                   "atexit.register(lambda: (prof.disable(), prof.dump_stats(out))); "
                   "from router.cli import main; prof.enable(); sys.exit(main())")


@dataclass(frozen=True)
class ProfiledContender(Contender):
    """Our router started under cProfile, its stats written to ``stats_path`` when it stops."""

    stats_path: str = ""

    def argv(self, port: int, engine_urls: Sequence[str], workdir: Path, **kw: Any) -> list[str]:
        python, flag, module, *rest = super().argv(port, engine_urls, workdir, **kw)
        assert (flag, module) == ("-m", "router"), "only our router can be profiled"
        return [python, "-c", PROFILED_ROUTER, self.stats_path, *rest]


# `python -c` bootstrap: our router's CLI imported from another checkout (argv[1]) put first on the path
TREE_ROUTER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
               "from router.cli import main; sys.exit(main())")


@dataclass(frozen=True)
class TreeContender(Contender):
    """Our router as another checkout ``tree`` has it (``--baseline-tree``): a change and its base in
    one run, taking turns, so a shared host's load falls on both alike."""

    tree: str = ""

    def argv(self, port: int, engine_urls: Sequence[str], workdir: Path, **kw: Any) -> list[str]:
        python, flag, module, *rest = super().argv(port, engine_urls, workdir, **kw)
        assert (flag, module) == ("-m", "router"), "only our router runs from another tree"
        return [python, "-c", TREE_ROUTER, self.tree, *rest]


def overhead_chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    """A ~200-token chat (8 system prompts shared round-robin, a distinct question): the request the
    router-overhead measurements repeat."""
    system = f"You are assistant number {i % 8}. " * 30
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"Question {i}: what is {i} times {i}?"}]}


@dataclass
class Sample:
    """One timed measurement: the streams' results and the CPU used meanwhile (``used``: the router pids,
    then the engine pids, then this process, as `CpuWatch.used`)."""

    results: list[StreamResult]
    wall: float
    used: list[float]
    busy_share: float
    other_share: float


def pooled(samples: Sequence[Sample]) -> Sample:
    """Several measurements of one level as one longer one (interleaved rounds)."""
    wall = sum(s.wall for s in samples)

    def mean(attr: str) -> float:
        return sum(getattr(s, attr) * s.wall for s in samples) / wall if wall > 0 else math.nan

    return Sample([r for s in samples for r in s.results], wall,
                  [sum(u) for u in zip(*(s.used for s in samples), strict=True)], mean("busy_share"),
                  mean("other_share"))


def level_stats(sample: Sample, n_router_pids: int) -> dict[str, Any]:
    """One load level's figures: throughput, TTFT/E2E, and CPU per 1,000 requests of router, engines and
    client."""
    results, wall, watch = sample.results, sample.wall, sample
    ok = [r for r in results if r.ok]
    per_k = 1000.0 / max(1, len(results))
    errors = [r.error or f"status {r.status}" for r in results if not r.ok]
    return {
        "requests": len(results), "errors": len(errors), "first_error": errors[0][:300] if errors else None,
        "wall_s": round(wall, 2), "req_per_s": round(len(results) / wall, 1) if wall > 0 else math.nan,
        "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
        "e2e_ms": summarize([r.e2e_s for r in ok], 1e3),
        "cpu_s_per_1k": {"router": round(sum(watch.used[:n_router_pids]) * per_k, 3),
                         "engines": round(sum(watch.used[n_router_pids:-1]) * per_k, 3),
                         "client": round(watch.used[-1] * per_k, 3)},
        "host_cpu_busy": round(watch.busy_share, 3),
        "other_cpu_share": round(watch.other_share, 3),  # other jobs on the machine: should be ~0
    }


def added(direct: dict[str, Any], routed: dict[str, Any]) -> dict[str, float]:
    """Router minus direct, per percentile: a difference of percentiles, not a percentile of differences
    (NaN where either side had no successful request)."""
    return {f"{m}_{q}": round(routed[f"{m}_ms"].get(q, math.nan) - direct[f"{m}_ms"].get(q, math.nan), 3)
            for m in ("ttft", "e2e") for q in ("p50", "p99")}


def contenders(args: argparse.Namespace) -> list[Contender]:
    out: list[Contender] = []
    if "ours" in args.contenders:
        out += our_contenders(args.our_policy)
        if args.profile_router:
            Path(args.profile_router).mkdir(parents=True, exist_ok=True)
            out = [ProfiledContender(**{f.name: getattr(c, f.name) for f in fields(c)},
                                     stats_path=str(Path(args.profile_router).resolve() / f"{slug(c.name)}.pstats"))
                   for c in out]
    if args.baseline_tree:  # the same router as another checkout has it, e.g. the commit a change starts from
        base = our_contenders(args.our_policy[:1])[0]
        out.append(TreeContender(**{f.name: getattr(base, f.name) for f in fields(base) if f.name != "name"},
                                 name=f"{base.name}@baseline", tree=str(Path(args.baseline_tree).resolve())))
    out += [peer_contender(kind, args.peer_policy) for kind in ("sglang-router", "vllm-router")
            if kind in args.contenders]
    if "aiohttp-floor" in args.contenders:
        out.append(floor_contender())
    return out


async def measure(session: Any, targets: Sequence[str], concurrency: int, args: argparse.Namespace,
                  pids: Sequence[int], engine_pids: Sequence[int]) -> Sample:
    """Warm up, then ``args.requests`` streams at ``concurrency`` to ``targets`` (round robin), timed and
    CPU-watched (``pids``: the router, if any)."""
    async def one(i: int) -> StreamResult:
        return await stream_chat(session, targets[i % len(targets)], overhead_chat_body(i, MAX_TOKENS), timeout_s=30)

    await closed_loop(max(args.warmup, concurrency), concurrency, args.max_s, one)
    watch = CpuWatch([*pids, *engine_pids]).start()
    t0 = time.perf_counter()
    results = await closed_loop(args.requests, concurrency, args.max_s, one)
    wall = time.perf_counter() - t0
    watch.stop()
    return Sample(results, wall, watch.used, watch.busy_share, watch.other_share)


async def measure_interleaved(session: Any, engine_urls: Sequence[str], routers: Sequence[Any], concurrency: int,
                              args: argparse.Namespace, engine_pids: Sequence[int]) -> tuple[Sample, list[Sample]]:
    """``args.requests`` streams per target, request i to target i % (1 + routers) (target 0: the engines,
    round robin): (direct sample, one sample per router). A router's CPU is its own (with its few idle ms
    while the others serve); the engines' and this process's, and the wall time, are split by requests."""
    n = len(routers) + 1

    async def one(i: int) -> tuple[int, StreamResult]:
        k = i % n
        url = routers[k - 1].url if k else engine_urls[(i // n) % len(engine_urls)]
        return k, await stream_chat(session, url, overhead_chat_body(i, MAX_TOKENS), timeout_s=30)

    await closed_loop(max(args.warmup, concurrency) * n, concurrency, args.max_s, one)
    watch = CpuWatch([*(r.pid for r in routers), *engine_pids]).start()
    t0 = time.perf_counter()
    done = await closed_loop(args.requests * n, concurrency, args.max_s * n, one)
    wall = time.perf_counter() - t0
    watch.stop()
    shared = watch.used[len(routers):]  # engines, then this process
    samples = []
    for k in range(n):
        results = [r for j, r in done if j == k]
        share = len(results) / max(1, len(done))
        own = [watch.used[k - 1]] if k else []
        samples.append(Sample(results, wall * share, [*own, *(u * share for u in shared)], watch.busy_share,
                              watch.other_share))
    return samples[0], samples[1:]


async def start_contenders(stack: contextlib.AsyncExitStack, cs: Sequence[Contender], fleet: Fleet,
                           args: argparse.Namespace, log_dir: Path) -> list[tuple[dict[str, Any], Any]]:
    """Start every contender (all run at once, idle while another is measured): (row, running router or
    None if it could not start, its row then saying why)."""
    started = []
    for c in cs:
        row: dict[str, Any] = {"name": c.name, "kind": c.kind, "policy": c.policy, "notes": c.notes,
                               "version": peer_version(c.kind), "argv": None, "error": None, "levels": []}
        r = None
        if (why := peer_available(c.kind)) is not None:
            row["error"] = why
        else:
            try:
                r = await stack.enter_async_context(run_router(c, fleet.engine_urls, log_dir,
                                                               start_timeout_s=args.start_timeout_s))
                row["argv"], row["version"] = r.argv, r.version
            except RouterStartError as exc:
                row["error"] = str(exc)
                print(f"  {c.name}: failed to start: {exc.reason}", flush=True)
        started.append((row, r))
    return started


async def measure_level(session: Any, fleet: Fleet, running: Sequence[tuple[dict[str, Any], Any]], conc: int,
                        args: argparse.Namespace) -> None:
    """One load level: ``args.rounds`` rounds (request by request with ``args.interleave``, else every
    contender in turn with a direct run before its own), pooled; appends the level to each row's
    ``levels`` and prints it."""
    samples: dict[str, tuple[list[Sample], list[Sample]]] = {row["name"]: ([], []) for row, _ in running}
    for _ in range(args.rounds):
        if args.interleave:
            direct_s, routed_s = await measure_interleaved(session, fleet.engine_urls, [r for _, r in running],
                                                         conc, args, fleet.engine_pids)
            for (row, _), routed_one in zip(running, routed_s, strict=True):
                samples[row["name"]][0].append(direct_s)  # one direct run, shared by all
                samples[row["name"]][1].append(routed_one)
            continue
        for row, r in running:
            direct, routed = samples[row["name"]]
            direct.append(await measure(session, fleet.engine_urls, conc, args, [], fleet.engine_pids))
            routed.append(await measure(session, [r.url], conc, args, [r.pid], fleet.engine_pids))
    for row, _ in running:
        direct_samples, routed_samples = samples[row["name"]]
        d, m = level_stats(pooled(direct_samples), 0), level_stats(pooled(routed_samples), 1)
        row["levels"].append({"concurrency": conc, "rounds": args.rounds, "direct": d, "router": m,
                              "added_ms": added(d, m)})
        print(f"  {row['name']} @ {conc}: {m['req_per_s']} req/s, added TTFT p50 "
              f"{row['levels'][-1]['added_ms']['ttft_p50']} ms, router CPU s/1k "
              f"{m['cpu_s_per_1k']['router']}, errors {m['errors']}", flush=True)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    """Per level, ``args.rounds`` rounds; in each, every contender in turn gets a direct run then its routed
    run. A level's figures pool its rounds, so contenders compared share the host's disturbances."""
    engine = EngineSpec(profile="instant")
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        async with (Fleet(args.engines, engine, None, log_dir=log_dir) as fleet,
                    client_session(fresh_connections=args.fresh_connections) as session,
                    contextlib.AsyncExitStack() as stack):
            started = await start_contenders(stack, contenders(args), fleet, args, log_dir)
            running = [(row, r) for row, r in started if r is not None]
            for conc in args.concurrency:
                await measure_level(session, fleet, running, conc, args)
    return {"benchmark": "overhead", "engines": args.engines, "profile": engine.profile, "max_tokens": MAX_TOKENS,
            "contenders": [row for row, _ in started]}


def _share(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def table(res: dict[str, Any]) -> str:
    """One row per level: direct (the run paired with the first contender), then each contender; a contender
    that failed gets one row with its error."""
    rows: list[list[Any]] = []
    levels = sorted({lv["concurrency"] for c in res["contenders"] for lv in c["levels"]})
    for conc in levels:
        shown_direct = False
        for c in res["contenders"]:
            lv = next((x for x in c["levels"] if x["concurrency"] == conc), None)
            if lv is None:
                continue
            if not shown_direct:
                d = lv["direct"]
                rows.append([conc, "direct", d["requests"], d["errors"], d["req_per_s"], d["ttft_ms"].get("p50"),
                             d["ttft_ms"].get("p99"), d["e2e_ms"].get("p50"), d["e2e_ms"].get("p99"), "", "", "",
                             "", "", _share(d["host_cpu_busy"]), _share(d["other_cpu_share"])])
                shown_direct = True
            m, a = lv["router"], lv["added_ms"]
            rows.append([conc, c["name"], m["requests"], m["errors"], m["req_per_s"], m["ttft_ms"].get("p50"),
                         m["ttft_ms"].get("p99"), m["e2e_ms"].get("p50"), m["e2e_ms"].get("p99"), a["ttft_p50"],
                         a["ttft_p99"], a["e2e_p50"], a["e2e_p99"], m["cpu_s_per_1k"]["router"],
                         _share(m["host_cpu_busy"]), _share(m["other_cpu_share"])])
    for c in res["contenders"]:
        if c["error"]:
            rows.append(["-", c["name"], "", "", "", "", "", "", "", "", "", "", "", "", "",
                         "ERROR: " + c["error"].splitlines()[0][:90]])
    return format_table(["conc", "router", "reqs", "err", "req/s", "TTFT p50", "p99", "E2E p50", "p99",
                         "added TTFT p50", "p99", "added E2E p50", "p99", "router CPU s/1k", "host busy",
                         "other procs"], rows)


def print_result(res: dict[str, Any]) -> None:
    rounds = res.get("args", {}).get("rounds", 1)
    print(f"\nrouter overhead: {res['engines']} `{res['profile']}` engines, streamed chat, {res['max_tokens']} "
          "tokens; ms; 'added' is router minus its direct runs" + (f"; {rounds} rounds pooled" if rounds > 1 else ""))
    print(table(res))
    for c in res["contenders"]:
        print(f"  {c['name']} {c['version'] or ''}: {' '.join(c['argv']) if c['argv'] else '(not started)'}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller run: at most 300 requests per level and router")
    p.add_argument("--engines", type=int, default=2, help="sim engine subprocesses (profile `instant`)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent streams per level")
    p.add_argument("--requests", type=int, default=2000,
                   help="measured streamed requests per level and round, for direct and for each router")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds per level, contenders taking turns within each; a level pools its rounds (a "
                        "shared host's load then falls on every contender alike)")
    p.add_argument("--interleave", action="store_true",
                   help="take turns request by request (direct and every router in one loop) instead of one "
                        "measurement each: compare contenders on a shared, noisy host")
    p.add_argument("--warmup", type=int, default=50,
                   help="unmeasured requests before each measurement (at least the concurrency)")
    p.add_argument("--max-s", type=float, default=60.0,
                   help="time cap per measurement (and per warm-up): no new request starts after it")
    p.add_argument("--contenders", nargs="+", default=["ours", "sglang-router", "vllm-router"],
                   choices=["ours", "sglang-router", "vllm-router", "aiohttp-floor"],
                   help="routers to measure besides direct; aiohttp-floor: a bare aiohttp relay with no routing "
                        "(`benchmarks.lib.floor_relay`), the least a router on our stack costs")
    p.add_argument("--our-policy", type=comma_list(choices=POLICY_NAMES), default="cost",
                   help="policy of our router; a comma list runs one router per policy (round_robin beside cost "
                        "splits the router's CPU into the policy's and the rest)")
    p.add_argument("--peer-policy", default="round_robin",
                   help="policy of both peers (round_robin: compares the proxy path, not the policy)")
    p.add_argument("--fresh-connections", action="store_true",
                   help="a new TCP connection per request instead of keep-alive (shows stalls on reused ones)")
    p.add_argument("--start-timeout-s", type=float, default=60.0, help="how long a router may take to route")
    p.add_argument("--profile-router", default=None, metavar="DIR",
                   help="run our router under cProfile (process CPU clock); <contender>.pstats written to DIR")
    p.add_argument("--baseline-tree", default=None, metavar="DIR",
                   help="also run our router from this checkout (e.g. `git worktree` of the base commit) as "
                        "'<policy>@baseline', taking turns with the others")
    p.add_argument("--log-dir", default=None, help="keep router and engine logs here (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS_DIR / "overhead.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 300)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    install_uvloop()
    info = machine_info()
    res = asyncio.run(amain(args))
    info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out = {"benchmark": "overhead", "machine": info, "args": {k: v for k, v in vars(args).items() if k != "out"},
           **{k: v for k, v in res.items() if k != "benchmark"}}
    print_result(out)
    write_json(Path(args.out), out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
