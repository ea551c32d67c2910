"""Routing quality, live over HTTP: the router issue's acceptance check.

    python -m benchmarks.quality            # full run (~6 min), writes results/quality.json
    python -m benchmarks.quality --quick    # smaller workloads, fewer policies

Four sim engines (`llmd-8b`: 30 ms + 250 us per uncached prompt token to prefill, 12 ms per decode step)
and one router run as subprocesses, restarted for every policy so each starts with cold caches; this
process is the client. The KV capacity (--num-blocks) is derived from each workload so that its
prefixes fit in the fleet when partitioned between the replicas, but not when every replica caches
everything: that is what separates prefix-aware routing from round robin.

(a) gsp, shared-prefix groups: G groups x Q questions; each group has a long system prompt, questions are
    short, output 32 tokens; C clients pull the (seeded) shuffled requests from one queue. The best
    achievable hit rate computes every group prefix exactly once in the fleet and never caches a
    question:  best = sum_g (Q - 1) * B * floor(floor(L_g / 4) / B) / sum_r ceil(len_r / 4),  with
    L_g the characters every rendered prompt of group g shares, len_r a rendered prompt's length,
    4 characters per token and B = 16 tokens per block.
(b) multiturn: C conversations x T turns, sequential within a conversation, concurrent across them.
    Every conversation starts with ONE shared system prompt (a third of the first turn); each turn
    re-sends the whole history plus the answer the engine returned. Baseline `pinned`: consistent_hash
    with `x-session-id: <conversation>` (the router's session header is the policy's affinity key).

Hit rate = sum cached_tokens / sum prompt_tokens from the streamed usage; the replica of each request is
the router's x-router-replica header; TTFT is measured by this client.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lib.client import StreamResult, client_session, fetch_text, prometheus_samples, stream_chat
from benchmarks.lib.cpu import CpuWatch
from benchmarks.lib.defaults import MODEL, PROFILE_COST_PARAMS, RESULTS_DIR
from benchmarks.lib.fleet import EngineSpec, Fleet, RouterSpec
from benchmarks.lib.loadgen import closed_loop
from benchmarks.lib.report import format_table, machine_info, run_benchmark
from benchmarks.lib.stats import summarize

REPLICAS = 4
PROFILE = "llmd-8b"
CHARS_PER_TOKEN = 4
BLOCK_TOKENS = 16
CAPACITY_SLACK = 1.35  # KV blocks = partitioned need x this (must stay well under the replicated need)
WORDS = ("the", "cache", "router", "engine", "token", "prompt", "block", "replica", "request", "decode",
         "prefill", "batch", "model", "river", "garden", "morning", "window", "number", "system", "answer")
Render = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class Variant:
    """One router configuration under test."""

    label: str
    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    session_header: bool = False  # send x-session-id: <conversation> (multiturn only)


def variants(args: argparse.Namespace, multiturn: bool) -> list[Variant]:
    """The configurations to run: `cost` with the profile's documented parameters (and, in full runs, with
    its defaults), the baselines, and `pinned` for multiturn; `--policies` keeps only the labels given."""
    tuned = PROFILE_COST_PARAMS.get(args.profile, {})
    out = [Variant("cost", "cost", dict(tuned))]
    if tuned and not args.quick:
        out.append(Variant("cost_defaults", "cost"))
    out += [Variant(p, p) for p in ("cache_aware", "round_robin", "least_load", "consistent_hash")]
    if multiturn:
        out.append(Variant("pinned", "consistent_hash", session_header=True))
    return [v for v in out if not args.policies or v.label in args.policies]


def renderer() -> Render:
    """The sim engine's chat template (what the engine tokenizes and caches)."""
    from engine_server.sim.backend import SimBackend, SimConfig

    return SimBackend(SimConfig(profile="instant", num_blocks=16)).render_chat


def words(rng: random.Random, chars: int) -> str:
    text = ""
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    return text[:chars]


def tokens_of_chars(chars: int) -> int:
    """Sim tokens of a text of ``chars`` characters (fixed 4-character chunks)."""
    return -(-chars // CHARS_PER_TOKEN)


def tokens(text: str) -> int:
    return tokens_of_chars(len(text))


def blocks_for(n_tokens: int) -> int:
    return -(-n_tokens // BLOCK_TOKENS)


def cacheable_tokens(shared_chars: int, prompt_chars: int) -> int:
    """Prompt tokens a perfect prefix cache can serve: whole blocks of whole shared tokens, never all."""
    full = shared_chars // CHARS_PER_TOKEN
    return min(full // BLOCK_TOKENS * BLOCK_TOKENS, tokens_of_chars(prompt_chars) - 1)


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def kv_blocks(partitioned: int, replicated: int) -> int:
    """Per-replica KV blocks: the partitioned need with slack, rounded up to 16; must not fit everything."""
    blocks = math.ceil(partitioned * CAPACITY_SLACK / 16) * 16
    if blocks >= replicated:
        raise ValueError(f"workload too small to separate policies: {blocks} blocks >= replicated need "
                         f"{replicated}")
    return blocks


# -- (a) shared-prefix groups -------------------------------------------------------------------------


@dataclass
class GspWorkload:
    bodies: list[dict[str, Any]]  # in sending order
    groups: list[int]  # group of each body
    best_hit_rate: float
    num_blocks: int
    capacity: dict[str, int]


def gsp_workload(args: argparse.Namespace, render: Render) -> GspWorkload:
    rng = random.Random(args.seed)
    systems = [f"Group {g}. " + words(rng, args.gsp_system_chars) for g in range(args.groups)]
    order = [(g, q) for g in range(args.groups) for q in range(args.questions)]
    rng.shuffle(order)
    bodies, groups, prompts = [], [], []
    for i, (g, q) in enumerate(order):
        messages = [{"role": "system", "content": systems[g]},
                    {"role": "user", "content": f"Question {q} of group {g}: " + words(rng, args.question_chars)}]
        bodies.append({"model": MODEL, "messages": messages, "max_tokens": args.gsp_max_tokens, "seed": i})
        groups.append(g)
        prompts.append(render(messages))
    best, shared_blocks = gsp_best(prompts, groups)
    private = max(blocks_for(tokens(p) + args.gsp_max_tokens) for p in prompts) - min(shared_blocks.values())
    group_blocks = max(shared_blocks.values()) + 1
    partitioned = math.ceil(args.groups / REPLICAS) * group_blocks + math.ceil(args.gsp_clients / REPLICAS) * private
    replicated = args.groups * group_blocks
    return GspWorkload(bodies, groups, best, kv_blocks(partitioned, replicated),
                       {"partitioned_need": partitioned, "replicated_need": replicated})


def gsp_best(prompts: Sequence[str], groups: Sequence[int]) -> tuple[float, dict[int, int]]:
    """The best achievable hit rate (module docstring) and each group's cacheable blocks."""
    members: dict[int, list[str]] = {}
    for p, g in zip(prompts, groups, strict=True):
        members.setdefault(g, []).append(p)
    cached = 0
    shared_blocks: dict[int, int] = {}
    for g, ps in members.items():
        shared = min(common_prefix(ps[0], p) for p in ps[1:]) if len(ps) > 1 else 0
        per = cacheable_tokens(shared, min(len(p) for p in ps)) if len(ps) > 1 else 0
        shared_blocks[g] = per // BLOCK_TOKENS
        cached += (len(ps) - 1) * per
    return cached / sum(tokens(p) for p in prompts), shared_blocks


async def run_gsp(fleet: Fleet, work: GspWorkload, clients: int, max_s: float) -> list[StreamResult]:
    assert fleet.router_url is not None
    url = fleet.router_url
    async with client_session() as session:
        return await closed_loop(len(work.bodies), clients, max_s,
                                 lambda i: stream_chat(session, url, work.bodies[i], timeout_s=max_s))


# -- (b) multi-turn ---------------------------------------------------------------------------------------


@dataclass
class Turn:
    conversation: int
    turn: int
    result: StreamResult


def aligned(messages: list[dict[str, str]], render: Render) -> list[dict[str, str]]:
    """Pad the last message with spaces so the rendered prompt is a whole number of sim tokens; then the
    answer the engine generates re-tokenizes into the very blocks it cached while decoding."""
    pad = -len(render(messages)) % CHARS_PER_TOKEN
    if pad:
        messages[-1]["content"] += " " * pad
    return messages


async def conversation(session: Any, url: str, c: int, args: argparse.Namespace, system: str,
                       render: Render, session_header: bool, stop_at: float) -> list[Turn]:
    rng = random.Random(args.seed * 1000 + c)
    messages = aligned([{"role": "system", "content": system},
                        {"role": "user", "content": f"Conversation {c}. " + words(rng, 2 * len(system))}], render)
    headers = {"x-session-id": f"conv-{c}"} if session_header else None
    turns: list[Turn] = []
    for t in range(args.turns):
        if time.monotonic() > stop_at:
            break
        body = {"model": MODEL, "messages": messages, "max_tokens": args.mt_max_tokens, "seed": c * 100 + t}
        r = await stream_chat(session, url, body, headers=headers, keep_text=True, timeout_s=args.max_run_s)
        turns.append(Turn(c, t, r))
        if not r.ok:
            break
        messages = aligned([*messages, {"role": "assistant", "content": r.text},
                            {"role": "user", "content": words(rng, args.mt_user_chars)}], render)
    return turns


def mt_capacity(args: argparse.Namespace, system: str) -> tuple[int, dict[str, int]]:
    """KV blocks for the multiturn run: a replica's share of whole conversations must fit, all of them not."""
    first = len(system) * 3 + 100
    final_tokens = tokens_of_chars(first + (args.turns - 1) * (args.mt_user_chars + 60
                                                                + CHARS_PER_TOKEN * args.mt_max_tokens))
    conv_blocks = blocks_for(final_tokens + args.mt_max_tokens)
    partitioned = math.ceil(args.conversations / REPLICAS) * conv_blocks
    replicated = args.conversations * conv_blocks
    return kv_blocks(partitioned, replicated), {"partitioned_need": partitioned, "replicated_need": replicated}


async def run_multiturn(fleet: Fleet, args: argparse.Namespace, system: str, render: Render,
                        session_header: bool) -> list[Turn]:
    assert fleet.router_url is not None
    stop_at = time.monotonic() + args.max_run_s
    async with client_session() as session:
        done = await asyncio.gather(*(conversation(session, fleet.router_url, c, args, system, render,
                                                   session_header, stop_at)
                                      for c in range(args.conversations)))
    return [t for conv in done for t in conv]


def stayed_share(turns: Sequence[Turn]) -> float:
    """Share of conversations whose turns 2..T all went to their turn-1 replica."""
    by_conv: dict[int, list[Turn]] = {}
    for t in turns:
        by_conv.setdefault(t.conversation, []).append(t)
    stayed = [len({t.result.replica for t in sorted(ts, key=lambda t: t.turn)}) == 1 for ts in by_conv.values()]
    return sum(stayed) / len(stayed) if stayed else math.nan


# -- running one policy --------------------------------------------------------------------------------


def summarize_results(results: Sequence[StreamResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    per_replica = Counter(r.replica or "?" for r in ok)
    counts = [per_replica.get(f"r{i}", 0) for i in range(REPLICAS)]
    mean = sum(counts) / REPLICAS
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "hit_rate": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else math.nan,
        "prompt_tokens": prompt, "cached_tokens": sum(r.cached_tokens for r in ok),
        "per_replica": counts, "max_over_mean": round(max(counts) / mean, 3) if mean else math.nan,
        "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1e3, 1),
        "error_samples": [r.error for r in results if not r.ok][:3],
    }


async def router_and_engine_stats(fleet: Fleet) -> dict[str, Any]:
    """Decisions by reason (router /metrics) and each engine's prefix-cache counters (/load)."""
    import json

    async with client_session() as s:
        text = await fetch_text(s, f"{fleet.router_url}/metrics")
        loads = [json.loads(await fetch_text(s, f"{u}/load")) for u in fleet.engine_urls]
    decisions = {labels["reason"]: int(v) for labels, v in prometheus_samples(text, "router_decisions_total")}
    engines = [{"prefix_cache_queries": ld["prefix_cache_queries"], "prefix_cache_hits": ld["prefix_cache_hits"],
                "kv_blocks_used": ld["kv_blocks_used"]} for ld in loads]
    return {"decisions": decisions, "engines": engines}


async def run_variant(workload: str, variant: Variant, args: argparse.Namespace, num_blocks: int,
                      job: Callable[[Fleet], Any]) -> dict[str, Any]:
    engine = EngineSpec(profile=args.profile, time_scale=args.time_scale, num_blocks=num_blocks)
    t0 = time.monotonic()
    router = RouterSpec(variant.policy, variant.params, load_poll_s=args.load_poll_s)
    async with Fleet(REPLICAS, engine, router, inprocess=args.inprocess) as fleet:
        t1 = time.monotonic()
        watch = CpuWatch([*([fleet.router_pid] if fleet.router_pid else []), *fleet.engine_pids]).start()
        results = await job(fleet)
        watch.stop()
        wall = time.monotonic() - t1
        stats = await router_and_engine_stats(fleet)
    flat = [t.result for t in results] if results and isinstance(results[0], Turn) else results
    row = {"label": variant.label, "policy": variant.policy, "params": variant.params,
           "session_header": variant.session_header, **summarize_results(flat), **stats,
           "run_s": round(wall, 1), "startup_s": round(t1 - t0, 1),
           "other_cpu_share": round(watch.other_share, 3)}  # other jobs on the machine: should be ~0
    if flat is not results:
        row["stayed_share"] = round(stayed_share(results), 3)
    print(f"  {workload:9s} {variant.label:16s} hit {row['hit_rate']:.3f}  max/mean {row['max_over_mean']:.2f}  "
          f"TTFT p50 {row['ttft_ms'].get('p50', math.nan)} ms  errors {row['errors']}  ({wall:.0f}s)", flush=True)
    return row


async def bench_gsp(args: argparse.Namespace, render: Render) -> dict[str, Any]:
    work = gsp_workload(args, render)
    print(f"(a) gsp: {args.groups} groups x {args.questions} questions, {args.gsp_clients} clients, "
          f"{work.num_blocks} KV blocks per replica {work.capacity}; best hit rate {work.best_hit_rate:.3f}",
          flush=True)
    rows = []
    for v in variants(args, multiturn=False):
        rows.append(await run_variant("gsp", v, args, work.num_blocks,
                                      lambda f: run_gsp(f, work, args.gsp_clients, args.max_run_s)))
        rows[-1]["ratio_to_best"] = round(rows[-1]["hit_rate"] / work.best_hit_rate, 3)
    return {"groups": args.groups, "questions": args.questions, "clients": args.gsp_clients,
            "system_chars": args.gsp_system_chars, "question_chars": args.question_chars,
            "max_tokens": args.gsp_max_tokens, "num_blocks": work.num_blocks, **work.capacity,
            "best_hit_rate": round(work.best_hit_rate, 4),
            "best_formula": "sum_g (Q_g - 1) * 16 * floor(floor(L_g / 4) / 16) / sum_r ceil(len_r / 4)",
            "rows": rows}


async def bench_multiturn(args: argparse.Namespace, render: Render) -> dict[str, Any]:
    system = "You are a helpful assistant. " + words(random.Random(args.seed), args.mt_system_chars)
    num_blocks, capacity = mt_capacity(args, system)
    print(f"(b) multiturn: {args.conversations} conversations x {args.turns} turns, {num_blocks} KV blocks "
          f"per replica {capacity}", flush=True)
    rows = []
    for v in variants(args, multiturn=True):
        rows.append(await run_variant("multiturn", v, args, num_blocks,
                                      lambda f, v=v: run_multiturn(f, args, system, render, v.session_header)))
    pinned = next((r["hit_rate"] for r in rows if r["label"] == "pinned"), math.nan)
    for r in rows:
        r["ratio_to_pinned"] = round(r["hit_rate"] / pinned, 3) if pinned else math.nan
    return {"conversations": args.conversations, "turns": args.turns, "system_chars": len(system),
            "first_user_chars": 2 * len(system), "user_chars": args.mt_user_chars,
            "max_tokens": args.mt_max_tokens, "num_blocks": num_blocks, **capacity, "rows": rows}


# -- acceptance and output ------------------------------------------------------------------------------


def acceptance(gsp: dict[str, Any] | None, mt: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's acceptance lines, for every `cost` variant that ran."""
    lines: list[dict[str, Any]] = []

    def check(name: str, passed: bool, detail: str) -> None:
        lines.append({"check": name, "pass": bool(passed), "detail": detail})

    if gsp:
        best = gsp["best_hit_rate"]
        rr = next((r for r in gsp["rows"] if r["label"] == "round_robin"), None)
        for c in (r for r in gsp["rows"] if r["policy"] == "cost"):
            check(f"gsp: {c['label']} hit rate >= 0.9 x best", c["hit_rate"] >= 0.9 * best,
                  f"{c['hit_rate']:.3f} vs 0.9 x {best:.3f} = {0.9 * best:.3f}")
            if rr is not None:
                check(f"gsp: {c['label']} hit rate clearly above round_robin (+0.10)",
                      c["hit_rate"] >= rr["hit_rate"] + 0.10, f"{c['hit_rate']:.3f} vs {rr['hit_rate']:.3f}")
            check(f"gsp: {c['label']} max/mean <= 1.3", c["max_over_mean"] <= 1.3, f"{c['max_over_mean']:.2f}")
    if mt:
        pinned = next((r for r in mt["rows"] if r["label"] == "pinned"), None)
        for c in (r for r in mt["rows"] if r["policy"] == "cost"):
            check(f"multiturn: {c['label']} max/mean <= 1.3", c["max_over_mean"] <= 1.3,
                  f"{c['max_over_mean']:.2f}")
            if pinned is not None:
                p = pinned["hit_rate"]
                check(f"multiturn: {c['label']} hit rate >= 0.95 x pinned", c["hit_rate"] >= 0.95 * p,
                      f"{c['hit_rate']:.3f} vs 0.95 x {p:.3f} = {0.95 * p:.3f}")
    return lines


def _decisions(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(row["decisions"].items()))


def print_gsp(res: dict[str, Any]) -> None:
    print(f"\n(a) gsp: {res['groups']} groups x {res['questions']} questions, {res['clients']} clients, "
          f"{res['num_blocks']} KV blocks/replica (partitioned need {res['partitioned_need']}, replicated "
          f"{res['replicated_need']}); best hit rate {res['best_hit_rate']:.3f} = {res['best_formula']}")
    rows = [[r["label"], r["requests"], r["errors"], r["hit_rate"], r["ratio_to_best"], r["max_over_mean"],
             "/".join(map(str, r["per_replica"])), r["ttft_ms"].get("p50"), r["ttft_ms"].get("p90"), r["run_s"],
             f"{r['other_cpu_share']:.0%}", _decisions(r)] for r in res["rows"]]
    print(format_table(["policy", "reqs", "err", "hit rate", "/best", "max/mean", "per replica", "TTFT p50 ms",
                        "p90", "run s", "other procs", "decisions"], rows))


def print_multiturn(res: dict[str, Any]) -> None:
    print(f"\n(b) multiturn: {res['conversations']} conversations x {res['turns']} turns, shared system prompt "
          f"{res['system_chars']} chars, first user message {res['first_user_chars']}, {res['num_blocks']} KV "
          f"blocks/replica (partitioned need {res['partitioned_need']}, replicated {res['replicated_need']})")
    rows = [[r["label"], r["requests"], r["errors"], r["hit_rate"], r["ratio_to_pinned"], r["max_over_mean"],
             "/".join(map(str, r["per_replica"])), r["stayed_share"], r["ttft_ms"].get("p50"),
             r["ttft_ms"].get("p90"), r["run_s"], f"{r['other_cpu_share']:.0%}", _decisions(r)] for r in res["rows"]]
    print(format_table(["policy", "reqs", "err", "hit rate", "/pinned", "max/mean", "per replica", "stayed",
                        "TTFT p50 ms", "p90", "run s", "other procs", "decisions"], rows))


def print_acceptance(lines: Sequence[dict[str, Any]]) -> None:
    print("\nacceptance")
    for line in lines:
        print(f"  {'PASS' if line['pass'] else 'FAIL'}  {line['check']}: {line['detail']}")


# -- main -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="8 groups x 4, 8 conversations x 4, fewer policies")
    p.add_argument("--workload", choices=["all", "gsp", "multiturn"], default="all")
    p.add_argument("--profile", default=PROFILE, help=f"sim profile of the engines (default {PROFILE})")
    p.add_argument("--time-scale", type=float, default=1.0, help="sim time scale (default 1.0: real time)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--gsp-clients", type=int, default=16)
    p.add_argument("--gsp-system-chars", type=int, default=6000, help="~1500 tokens")
    p.add_argument("--question-chars", type=int, default=100)
    p.add_argument("--gsp-max-tokens", type=int, default=32)
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--mt-system-chars", type=int, default=2000, help="shared system prompt (~500 tokens)")
    p.add_argument("--mt-user-chars", type=int, default=400, help="follow-up user messages")
    p.add_argument("--mt-max-tokens", type=int, default=32)
    p.add_argument("--policies", nargs="+", metavar="LABEL",
                   help="run only these (cost, cost_defaults, cache_aware, round_robin, least_load, "
                        "consistent_hash, pinned)")
    p.add_argument("--load-poll-s", type=float, default=0.5, help="router's /load poll interval (default 0.5)")
    p.add_argument("--max-run-s", type=float, default=120.0, help="cap per policy run (no new request after)")
    p.add_argument("--inprocess", action="store_true",
                   help="engines and router in this process (smoke tests only: one shared event loop)")
    p.add_argument("--out", default=str(RESULTS_DIR / "quality.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.groups, args.questions, args.gsp_clients = 8, 4, 8
        args.conversations, args.turns = 8, 4
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    render = renderer()
    out: dict[str, Any] = {"benchmark": "quality", "machine": machine_info(), "profile": args.profile,
                           "time_scale": args.time_scale, "replicas": REPLICAS,
                           "args": {k: v for k, v in vars(args).items() if k != "out"}}
    gsp = await bench_gsp(args, render) if args.workload in ("all", "gsp") else None
    mt = await bench_multiturn(args, render) if args.workload in ("all", "multiturn") else None
    out.update({"gsp": gsp, "multiturn": mt, "acceptance": acceptance(gsp, mt)})
    if gsp:
        print_gsp(gsp)
    if mt:
        print_multiturn(mt)
    print_acceptance(out["acceptance"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(lambda: amain(args), Path(args.out))


if __name__ == "__main__":
    raise SystemExit(main())
