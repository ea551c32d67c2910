"""Router micro-benchmarks: policy decision time, and whether the relay delays chunks.

    python -m benchmarks.router_micro                 # full run (~2 min), writes results/router_micro.json
    python -m benchmarks.router_micro --quick         # a smaller run
    python -m benchmarks.router_micro --skip-proxy    # decision times only
    python -m benchmarks.router_micro --skip-proxy --replicas 16 1000 --policies cost --cpu-clock

(a) Decision time. Each policy's index is filled with `--prefixes` distinct prompts (1,000 system
    prompts of 1,920 chars x 100 questions, plus 10 documents of 100k chars) dispatched over 4 and 8
    replicas (``--replicas``; ``--replicas 16 1000 --policies cost`` times cost's candidate pre-filter),
    then ``choose()`` and ``choose() + on_dispatch()`` are timed one call at a time with
    ``perf_counter_ns`` (``--cpu-clock``: the thread's CPU clock, for a shared host) and the garbage
    collector off, for a hit (known system prompt, new question), a
    miss (unknown prompt) and a long hit (known 100k-char document, new question). Prompt parsing and
    hashing is timed separately. Goal: p99 <= 50 us.
(b) Proxy overhead moved to `python -m benchmarks.overhead` (one overhead benchmark: ours beside the
    peers, each router started by its own command line); ``--concurrency`` and ``--requests`` are still
    accepted and print the equivalent overhead command.
(c) Chunk promptness. With a sim that emits a token every engine step (`h100-llama3-8b`, one step =
    5.75 ms x time scale), the gaps between consecutive chunks at the client, direct vs routed, show any
    batching or Nagle/delayed-ACK stall (~40 ms) the relay adds.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.lib.client import StreamResult, client_session, stream_chat
from benchmarks.lib.comma import positive_int
from benchmarks.lib.cpu import CpuWatch
from benchmarks.lib.defaults import MODEL, RESULTS_DIR
from benchmarks.lib.fleet import EngineSpec, Fleet, RouterSpec
from benchmarks.lib.loadgen import closed_loop
from benchmarks.lib.report import format_table, machine_info, run_benchmark
from benchmarks.lib.stats import percentile, summarize
from router.features import (
    HashingConfig,
    RequestFeatures,
    block_hashes,
    features_from_body,
    features_from_text,
)
from router.policies import create_policy
from router.policies.base import Decision, Outcome, Policy
from router.replica_view import ReplicaView

HASHING = HashingConfig()
ALPHABET = "abcdefghijklmnopqrstuvwxyz      "
POLICIES = ("cost", "cache_aware", "consistent_hash", "least_load", "power_of_two", "round_robin", "random")
SYSTEM_CHARS = 1920  # 30 blocks of 64 chars
QUESTIONS_PER_SYSTEM = 100
LONG_DOCS, LONG_CHARS = 10, 100_000
DECISION_GOAL_US = 50.0


# -- (a) decision time -------------------------------------------------------------------------------


def _text(rng: random.Random, chars: int) -> str:
    return "".join(rng.choices(ALPHABET, k=chars))


def _question(tag: str) -> str:
    """~256 chars that differ from the first character: distinct questions diverge at their first block."""
    return f"\nquestion {tag}: " + "please explain the answer in detail. " * 6


@dataclass
class Corpus:
    """Prompts to fill the index with, and probe prompts for each case (one per timed call)."""

    systems: list[str]
    docs: list[str]
    fill: list[RequestFeatures]
    probes: dict[str, list[RequestFeatures]]


def build_corpus(prefixes: int, iterations: int, seed: int = 1) -> Corpus:
    rng = random.Random(seed)
    n_systems = max(1, prefixes // QUESTIONS_PER_SYSTEM)
    systems = [_text(rng, SYSTEM_CHARS) for _ in range(n_systems)]
    docs = [_text(rng, LONG_CHARS) for _ in range(LONG_DOCS)]
    fill = [features_from_text(systems[s] + _question(f"{q}-{s}"), MODEL, f"f{q}-{s}", HASHING, max_tokens=32)
            for q in range(QUESTIONS_PER_SYSTEM) for s in range(n_systems)][:prefixes]
    fill += [features_from_text(d + _question("doc"), MODEL, f"d{i}", HASHING) for i, d in enumerate(docs)]

    def probe(case: str, i: int) -> RequestFeatures:
        if case == "hit":
            text = systems[i % n_systems] + _question(f"new-{i}")
        elif case == "miss":
            text = _text(rng, SYSTEM_CHARS) + _question(f"new-{i}")
        else:
            text = docs[i % LONG_DOCS] + _question(f"new-{i}")
        return features_from_text(text, MODEL, f"p{case}{i}", HASHING, max_tokens=32)

    probes = {case: [probe(case, i) for i in range(n)]
              for case, n in (("hit", iterations), ("miss", iterations), ("long_hit", max(1, iterations // 10)))}
    return Corpus(systems, docs, fill, probes)


def views_for(n: int) -> list[ReplicaView]:
    """Replicas with some load and a fresh report, so load-aware code paths run (not the idle shortcut)."""
    return [ReplicaView(name=f"r{i}", url=f"http://r{i}", in_flight_requests=4 + i % 3,
                        in_flight_tokens=1500 * (i % 2), running=4 + i % 3, waiting=i % 2,
                        kv_blocks_used=150_000, kv_blocks_total=400_000, block_size=16, load_age_s=0.2)
            for i in range(n)]


def _outcome(features: RequestFeatures, decision: Decision) -> Outcome:
    """A successful completion whose cached tokens match the policy's prediction (no index correction)."""
    cached = min(int(decision.matched_blocks * features.block_tokens), features.token_estimate)
    return Outcome(ok=True, status=200, ttft_s=0.01, prompt_tokens=features.token_estimate,
                   cached_tokens=cached, completion_tokens=32)


def fill_policy(policy: Policy, corpus: Corpus, names: Sequence[str]) -> float:
    """Dispatch and complete every fill prompt, spread over ``names``; returns seconds taken."""
    t0 = time.perf_counter()
    n = len(names)
    for k, f in enumerate(corpus.fill):
        d = Decision(replica=names[(k + k // max(1, len(corpus.systems))) % n], reason="fill")
        policy.on_dispatch(f, d)
        policy.on_complete(f, d, _outcome(f, d))
    return time.perf_counter() - t0


def time_decisions(policy: Policy, probes: Sequence[RequestFeatures], views: Sequence[ReplicaView],
                   dispatch: bool, max_s: float, cpu_clock: bool = False,
                   priced: list[int] | None = None) -> list[int]:
    """Nanoseconds of each ``choose()`` (plus ``on_dispatch()`` when asked), one probe per call.

    The completion that keeps the policy's in-flight bookkeeping steady is not timed. ``cpu_clock``
    times with this thread's CPU clock: on a shared host, wall time also counts other jobs' slices.
    ``priced`` (optional) gets how many replicas each decision scored: the work a decision did, which a
    busy host does not blur.
    """
    clock = time.thread_time_ns if cpu_clock else time.perf_counter_ns
    deadline = time.monotonic() + max_s
    samples: list[int] = []
    gc.collect()
    gc.disable()
    try:
        for i, f in enumerate(probes):
            t0 = clock()
            d = policy.choose(f, views)
            if dispatch:
                policy.on_dispatch(f, d)
            samples.append(clock() - t0)
            if priced is not None:
                priced.append(len(d.scores) if d.scores else 0)
            if dispatch:
                policy.on_complete(f, d, _outcome(f, d))
            if i & 255 == 0 and time.monotonic() > deadline:
                break
    finally:
        gc.enable()
    return samples


def _us(samples_ns: Sequence[int]) -> dict[str, float]:
    return {"p50": round(percentile(samples_ns, 0.5) / 1e3, 2), "p99": round(percentile(samples_ns, 0.99) / 1e3, 2),
            "mean": round(statistics.fmean(samples_ns) / 1e3, 2), "n": len(samples_ns)}


def best_of(passes: Sequence[Sequence[int]]) -> list[int]:
    """Each probe's fastest time over several passes (over the probes every pass reached): the work a
    decision does, without the host's preemptions and interrupts that single timings carry."""
    n = min(len(p) for p in passes)
    return [min(p[i] for p in passes) for i in range(n)]


def bench_policy(name: str, corpus: Corpus, replicas: int, max_s: float, cpu_clock: bool = False,
                 repeats: int = 1) -> dict[str, Any]:
    views = views_for(replicas)
    policy = create_policy(name, seed=0)
    for v in views:
        policy.on_replica_added(v.name)
    policy.choose(corpus.fill[0], views)  # lets capacity-aware policies size their index first
    fill_s = fill_policy(policy, corpus, [v.name for v in views])
    index = getattr(policy, "index", None)
    row: dict[str, Any] = {"policy": name, "replicas": replicas, "fill_s": round(fill_s, 2),
                           "index_blocks": index.size() if index is not None else None, "cases": {}}
    for case, probes in corpus.probes.items():
        passes = [time_decisions(policy, probes, views, dispatch=False, max_s=max_s, cpu_clock=cpu_clock)
                  for _ in range(repeats)]
        choose = passes[0]
        priced: list[int] = []
        both = time_decisions(policy, probes, views, dispatch=True, max_s=max_s, cpu_clock=cpu_clock,
                              priced=priced)
        row["cases"][case] = {"choose_us": _us(choose), "choose_best_us": _us(best_of(passes)),
                              "choose_dispatch_us": _us(both),
                              "priced": {"mean": round(statistics.fmean(priced), 1), "max": max(priced)}}
    return row


def time_fn(fn: Callable[[], object], repeat: int, max_s: float) -> dict[str, float]:
    clock = time.perf_counter_ns
    deadline = time.monotonic() + max_s
    samples: list[int] = []
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = clock()
            fn()
            samples.append(clock() - t0)
            if time.monotonic() > deadline:
                break
    finally:
        gc.enable()
    return _us(samples)


def bench_parsing(corpus: Corpus, max_s: float) -> list[dict[str, Any]]:
    """Per-request work before the policy: canonical chat text + block hashes, and hashing alone."""
    system, doc = corpus.systems[0], corpus.docs[0]
    typical = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "system", "content": system},
                                                              {"role": "user", "content": _question("x")}]}
    long_body = {**typical, "messages": [{"role": "user", "content": doc}]}
    cases = [
        ("features_from_body, chat", len(system) + 256, lambda: features_from_body(typical, "chat", "r", HASHING)),
        ("features_from_body, chat", LONG_CHARS, lambda: features_from_body(long_body, "chat", "r", HASHING)),
        ("block_hashes", LONG_CHARS, lambda: block_hashes(doc, HASHING.block_chars, MODEL)),
    ]
    return [{"what": what, "chars": chars, **time_fn(fn, 2000 if chars < 10_000 else 300, max_s)}
            for what, chars, fn in cases]


def run_decisions(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    corpus = build_corpus(args.prefixes, args.iterations)
    print(f"(a) corpus: {len(corpus.fill)} fill prompts, {args.iterations} probes per case "
          f"({time.perf_counter() - t0:.1f}s to build)", flush=True)
    rows = []
    watch = CpuWatch().start()
    for replicas in args.replicas:
        for name in args.policies:
            rows.append(bench_policy(name, corpus, replicas, args.max_case_s, args.cpu_clock, args.repeats))
            print(f"    {name} x{replicas} done", flush=True)
    parsing = bench_parsing(corpus, args.max_case_s)
    watch.stop()
    return {"prefixes": len(corpus.fill), "iterations": args.iterations, "repeats": args.repeats,
            "goal_p99_us": DECISION_GOAL_US,
            "other_cpu_share": round(watch.other_share, 3), "policies": rows, "parsing": parsing}


def print_decisions(res: dict[str, Any]) -> None:
    print(f"\n(a) decision time, {res['prefixes']:,} indexed prompts, microseconds "
          f"(goal: choose+dispatch p99 <= {DECISION_GOAL_US:g} us; other jobs used "
          f"{_share(res['other_cpu_share'])} of the CPUs meanwhile)")
    rows = []
    for r in res["policies"]:
        for case, c in r["cases"].items():
            ch, both = c["choose_us"], c["choose_dispatch_us"]
            best = c.get("choose_best_us", {})
            rows.append([r["policy"], r["replicas"], case, ch["p50"], ch["p99"], ch["mean"], best.get("p50", "-"),
                         best.get("p99", "-"), both["p50"],
                         both["p99"], both["mean"], "ok" if both["p99"] <= DECISION_GOAL_US else "OVER",
                         c.get("priced", {}).get("mean", "-"),
                         r["index_blocks"] if r["index_blocks"] is not None else "-"])
    print(f"('best of {res.get('repeats', 1)}': each probe's fastest choose() over that many passes, the work "
          "of a decision without the host's interruptions; the goal is judged on the single timings)")
    print(format_table(["policy", "repl", "case", "choose p50", "p99", "mean", "best p50", "best p99",
                        "+dispatch p50", "p99", "mean",
                        "goal", "priced", "index blocks"], rows))
    print("\nper-request parsing and hashing (before the policy), microseconds")
    print(format_table(["what", "chars", "p50", "p99", "mean"],
                       [[p["what"], p["chars"], p["p50"], p["p99"], p["mean"]] for p in res["parsing"]]))


def _share(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0%}"


# -- (c) chunk promptness ------------------------------------------------------------------------------


def tiny_body(i: int, max_tokens: int) -> dict[str, Any]:
    """A ~10-token prompt: its prefill barely lengthens the engine step that other streams decode in."""
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"hi {i}"}]}


def gaps_ms(results: Sequence[StreamResult]) -> list[float]:
    """Gaps between consecutive content chunks of each stream, in ms (the first chunk is TTFT, not a gap)."""
    return [(b - a) * 1e3 for r in results if r.ok for a, b in zip(r.arrivals, r.arrivals[1:], strict=False)]


async def run_gaps(args: argparse.Namespace) -> dict[str, Any]:
    from engine_server.sim.timing import get_profile

    engine = EngineSpec(profile="h100-llama3-8b", time_scale=args.gap_time_scale)
    step_ms = get_profile(engine.profile).step_overhead_s * engine.time_scale * 1e3
    levels = []
    async with Fleet(args.engines, engine, RouterSpec(policy="cost"), inprocess=args.inprocess) as fleet, \
            client_session() as session:
        for c, streams in ((1, args.gap_streams // 4), (16, args.gap_streams)):
            row: dict[str, Any] = {"concurrency": c}
            for mode, targets in (("direct", fleet.engine_urls), ("router", [fleet.router_url])):
                async def one(i: int, targets: Sequence[str] = targets) -> StreamResult:
                    return await stream_chat(session, targets[i % len(targets)], tiny_body(i, args.gap_tokens))

                watch = CpuWatch([*([fleet.router_pid] if fleet.router_pid else []), *fleet.engine_pids]).start()
                results = await closed_loop(max(1, streams), c, args.max_level_s, one)
                watch.stop()
                g = gaps_ms(results)
                row[mode] = {"streams": len(results), "errors": sum(not r.ok for r in results),
                             "gap_ms": summarize(g), "gaps_over_30ms": sum(x > 30 for x in g),
                             "other_cpu_share": round(watch.other_share, 3)}
            d, r = row["direct"]["gap_ms"], row["router"]["gap_ms"]
            row["extra_ms"] = {"p99": round(r["p99"] - d["p99"], 3), "max": round(r["max"] - d["max"], 3)}
            levels.append(row)
    return {"profile": engine.profile, "time_scale": engine.time_scale, "expected_gap_ms": round(step_ms, 2),
            "tokens": args.gap_tokens, "levels": levels}


def print_gaps(res: dict[str, Any]) -> None:
    print(f"\n(c) inter-chunk gaps at the client, ms (engine step ~{res['expected_gap_ms']} ms: "
          f"`{res['profile']}` x{res['time_scale']}, {res['tokens']} tokens per stream)")
    rows = []
    for lv in res["levels"]:
        for mode in ("direct", "router"):
            m = lv[mode]
            rows.append([lv["concurrency"], mode, m["streams"], m["errors"], m["gap_ms"]["p50"], m["gap_ms"]["p99"],
                         m["gap_ms"]["max"], m["gaps_over_30ms"], _share(m["other_cpu_share"])])
        rows.append([lv["concurrency"], "extra", "", "", "", lv["extra_ms"]["p99"], lv["extra_ms"]["max"], "", ""])
    print(format_table(["conc", "mode", "streams", "err", "gap p50", "p99", "max", "gaps > 30 ms", "other procs"],
                       rows))


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_micro",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller run: 10k prefixes, fewer requests")
    p.add_argument("--prefixes", type=int, default=100_000, help="prompts indexed before timing (a)")
    p.add_argument("--iterations", type=int, default=20_000, help="timed calls per policy and case (a)")
    p.add_argument("--max-case-s", type=float, default=10.0, help="time cap per timed case (a)")
    p.add_argument("--replicas", type=int, nargs="+", default=[4, 8],
                   help="fleet sizes for (a); e.g. 16 1000 --policies cost for cost's candidate pre-filter")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="(a) passes of choose() over the probes: the first is reported as timed, and each probe's "
                        "fastest pass as 'best of'")
    p.add_argument("--cpu-clock", action="store_true",
                   help="(a) timed with the thread's CPU clock, not wall time (a host shared with other jobs)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES, help="policies for (a)")
    p.add_argument("--engines", type=int, default=2, help="sim engine subprocesses (c)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 100],
                   help="(b) now in benchmarks.overhead: only printed as its equivalent command")
    p.add_argument("--requests", type=int, default=2000,
                   help="(b) now in benchmarks.overhead: only printed as its equivalent command")
    p.add_argument("--max-level-s", type=float, default=60.0, help="time cap per level and mode (c)")
    p.add_argument("--gap-streams", type=int, default=32, help="streams at 16 concurrent (c; a quarter at 1)")
    p.add_argument("--gap-tokens", type=int, default=48, help="tokens per stream (c)")
    p.add_argument("--gap-time-scale", type=float, default=2.0, help="sim time scale for (c)")
    p.add_argument("--skip-decisions", action="store_true")
    p.add_argument("--skip-proxy", action="store_true", help="skip (c)")
    p.add_argument("--inprocess", action="store_true",
                   help="engines and router in this process (smoke tests only: one shared event loop)")
    p.add_argument("--out", default=str(RESULTS_DIR / "router_micro.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.prefixes, args.iterations = min(args.prefixes, 10_000), min(args.iterations, 5_000)
        args.requests, args.gap_streams, args.gap_tokens = min(args.requests, 500), 16, 24
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "router_micro", "machine": machine_info(),
                           "args": {k: v for k, v in vars(args).items() if k != "out"}}
    if not args.skip_decisions:
        out["decisions"] = run_decisions(args)
        print_decisions(out["decisions"])
    if not args.skip_proxy:
        out["chunk_gaps"] = await run_gaps(args)
        print_gaps(out["chunk_gaps"])
    print("\n(b) proxy overhead: " + overhead_command(args))
    return out


def overhead_command(args: argparse.Namespace) -> str:
    """The `benchmarks.overhead` run that measures what (b) used to: our router alone, policy `cost`."""
    return (f"python -m benchmarks.overhead --contenders ours --our-policy cost --engines {args.engines} "
            f"--concurrency {' '.join(map(str, args.concurrency))} --requests {args.requests}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(lambda: amain(args), Path(args.out))


if __name__ == "__main__":
    raise SystemExit(main())
