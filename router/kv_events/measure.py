"""``python -m router.kv_events.measure``: what exact prefix routing costs the router per request.

Replays growing chat sessions (round robin, each turn = the history + an assistant reply + a user
message, as clients re-send conversations) over ``--replicas`` replicas whose event-fed indexes hold every
earlier turn's blocks (``--stored all``, the most matching work; ``chosen``: only where the policy sent it),
and times, per request, what the live router does for it (`router.app` then `router.routing`):

- ``parse``: `features_from_body` and the lazy `RequestFeatures.kv_match`;
- ``template``: render the chat template; ``encode``: its token ids (with the tokenizer's caches);
- ``keys``: the blocks' chained keys; ``match``: every replica's leading blocks held;
- ``decide``: the default ``cost`` policy's ``choose`` over the replicas' views and ``on_dispatch``
  (`RoutingCore.choose` + `RoutingCore.dispatch`).

The parts run in the live path's order on its objects (`RequestMatch.compute_timed` is `RequestMatch`'s
own computation with a clock read between the steps). Prints one JSON line: p50/p99/max in ms of the total
and of each part, for turns ("warm", the history seen before) and first sights ("cold"), the slowest
requests with their parts, and the garbage collections during the timed work. CPU time of this thread
(``time.thread_time``), so other processes on a shared host do not inflate it. Seeded: the same run does
the same work. ``--gc freeze`` freezes the setup's objects (`gc.freeze`) before the timed loop, as a
server may after startup; ``router`` as a running router sets it (`router.gc_tuning`: frozen and a young
threshold of 50,000); ``off`` disables the collector during it (a bound, not a setting to ship).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import time
from collections.abc import Sequence
from typing import Any

from kv_wire import BlockStored, KVEventBatch
from router.features.hashing import HashingConfig, token_block_hashes
from router.features.parse import features_from_body
from router.features.tokenize import load_tokenizer
from router.gc_tuning import Tuning
from router.kv_events.precise import PreciseIndex
from router.kv_events.prefix_source import PrefixSource
from router.policies.base import Outcome
from router.policies.cost import Cost
from router.replicas.state import LoadSnapshot, ReplicaState
from router.routing import RoutingCore

WORDS = ("cache", "block", "router", "engine", "prefix", "token", "the", "of", "and", "model", "batch",
         "queue", "stream", "latency", "replica", "memory", "request", "system", "value", "result")
PARTS = ("parse", "template", "encode", "keys", "match", "decide")
GC_MODES = ("default", "freeze", "router", "off")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 4)


def _summary(xs: Sequence[float]) -> dict[str, float]:
    return {"p50": _pct(xs, 0.5), "p99": _pct(xs, 0.99), "max": _pct(xs, 1.0), "n": len(xs)}


def _store(index: PreciseIndex, names: Sequence[str], ids: list[int], seqs: dict[str, int]) -> None:
    """``names`` cache the prompt's full blocks (engine hash = our key: the index re-keys anyway)."""
    for name in names:
        sync = index.replica(name)
        assert sync is not None
        bs, model = sync.index.block_size, sync.index.model
        keys = token_block_hashes(ids, bs, model)
        ev = BlockStored(block_hashes=list(keys), parent_block_hash=None, token_ids=ids[: len(keys) * bs],
                         block_size=bs, lora_id=None, medium="GPU", lora_name=None)
        sync.on_live(seqs[name], KVEventBatch(ts=float(seqs[name]), events=[ev]))
        seqs[name] += 1


def _fleet(replicas: int, block_size: int, now: float) -> list[ReplicaState]:
    """Replicas with a fresh load report each (a few running, none waiting, KV room for ~50 prompts)."""
    out = []
    for r in range(replicas):
        state = ReplicaState.create(f"r{r}", f"http://127.0.0.1:{41000 + r}")
        state.load = LoadSnapshot(running=2 + r % 3, waiting=0, kv_blocks_used=1000, kv_blocks_total=16_384,
                                  block_size=block_size, prefix_cache_queries=0, prefix_cache_hits=0,
                                  received_at=now)
        out.append(state)
    return out


def run(tokenizer: str, replicas: int, tokens: int, sessions: int, turns: int, block_size: int,
        seed: int = 0, gc_mode: str = "default", stored: str = "all") -> dict[str, Any]:
    if gc_mode not in GC_MODES:
        raise ValueError(f"gc_mode must be one of {GC_MODES}")
    rng = random.Random(seed)
    tok = load_tokenizer(tokenizer)
    index = PreciseIndex()
    seqs = {}
    for r in range(replicas):
        sync = index.add_replica(f"r{r}", block_size, "m")
        sync.full_resync()
        sync.on_replay_end(ok=True)
        seqs[f"r{r}"] = 0
    source = PrefixSource(index, tok)
    hashing = HashingConfig()
    now = 1000.0  # the routing core's clock: fixed, so the load reports stay fresh and decisions repeat
    fleet = _fleet(replicas, block_size, now)
    core = RoutingCore(Cost(seed=seed))
    system = _text(rng, 200)
    # Each session starts at ~ `tokens` minus the growth of its turns, so the measured turns are ~ tokens.
    # Sized with another tokenizer instance: the measured one must see each session first at turn 0 (cold).
    sizer = load_tokenizer(tokenizer)
    chats = []
    for _ in range(sessions):
        msgs = [{"role": "system", "content": system}]
        while True:
            ids = sizer.prompt_ids({"messages": msgs}, "chat") or []
            if len(ids) >= tokens - 60 * turns:
                break
            msgs += [{"role": "user", "content": _text(rng, 150)}, {"role": "assistant", "content": _text(rng, 150)}]
        chats.append(msgs)
    cold: dict[str, list[float]] = {p: [] for p in ("total", *PARTS)}
    warm: dict[str, list[float]] = {p: [] for p in ("total", *PARTS)}
    lengths: list[int] = []
    slowest: list[tuple[float, int, int, dict[str, float], int]] = []
    with_gc: list[float] = []  # totals of the requests during which the collector ran
    collections = [0, 0, 0]

    def count_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections[info["generation"]] += 1

    clock = time.thread_time
    tuning = Tuning()
    if gc_mode == "freeze":
        gc.collect()
        gc.freeze()
    elif gc_mode == "router":
        tuning.apply()
    elif gc_mode == "off":
        gc.disable()
    gc.callbacks.append(count_gc)
    try:
        for turn in range(turns):
            for s in range(sessions):
                chats[s] = chats[s] + [{"role": "user", "content": _text(rng, 30)}]
                body = {"messages": chats[s], "model": "m"}
                gcs = sum(collections)
                t0 = clock()
                features = features_from_body(body, "chat", f"t{turn}s{s}", hashing)
                match = source.for_request(body, "chat")
                features = dataclasses.replace(features, kv_match=match)
                t1 = clock()
                template, encode, keys, matching = match.compute_timed(clock)
                t2 = clock()
                route = core.choose(features, fleet, now=now)
                lease = core.dispatch(route, features, now)
                t3 = clock()
                parts = {"parse": t1 - t0, "template": template, "encode": encode, "keys": keys,
                         "match": matching, "decide": t3 - t2}
                total = (t1 - t0) + (t3 - t2) + template + encode + keys + matching
                into = cold if turn == 0 else warm
                into["total"].append(total)
                for p, dt in parts.items():
                    into[p].append(dt)
                ids = match.token_ids or []
                lengths.append(len(ids))
                slowest.append((total, turn, len(ids), parts, sum(collections) - gcs))
                if sum(collections) > gcs:
                    with_gc.append(total)
                assert len(match.match()) == replicas
                _store(index, index.names() if stored == "all" else [route.decision.replica], ids, seqs)
                cached = route.decision.matched_blocks * block_size
                core.complete(route, lease, features, Outcome(ok=True, status=200, ttft_s=0.05, e2e_s=0.5,
                              prompt_tokens=len(ids), cached_tokens=min(cached, len(ids)),
                              completion_tokens=30), now=now)
                chats[s] = chats[s] + [{"role": "assistant", "content": _text(rng, 30)}]
    finally:
        gc.callbacks.remove(count_gc)
        if gc_mode == "freeze":
            gc.unfreeze()
        elif gc_mode == "router":
            tuning.release()
        elif gc_mode == "off":
            gc.enable()
    slowest.sort(key=lambda x: x[0], reverse=True)
    return {"tokenizer": tokenizer, "replicas": replicas, "block_size": block_size, "gc": gc_mode,
            "stored": stored, "sessions": sessions,
            "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
            "warm_ms": {p: _summary(xs) for p, xs in warm.items()},
            "cold_ms": {p: _summary(xs) for p, xs in cold.items()},
            "slowest": [{"ms": round(t * 1000, 3), "turn": turn, "tokens": n, "gc": g,
                         "parts": {p: round(v * 1000, 3) for p, v in parts.items()}}
                        for t, turn, n, parts, g in slowest[:3]],
            "gc_collections": collections,
            "with_gc_ms": sorted(round(t * 1000, 3) for t in with_gc)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router.kv_events.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="sim", help="sim, or a model path / hub id (default sim)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length of the measured turns")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=40)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gc", choices=GC_MODES, default="default",
                   help="collector during the timed loop: as is, setup frozen (gc.freeze), as a running router sets it (router.gc_tuning), or disabled")
    p.add_argument("--stored", choices=("all", "chosen"), default="all",
                   help="which replicas cache each prompt: every one (most matching work) or the chosen one")
    args = p.parse_args(argv)
    print(json.dumps(run(args.tokenizer, args.replicas, args.tokens, args.sessions, args.turns,
                         args.block_size, args.seed, args.gc, args.stored)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
