"""``python -m router.kv_events.measure``: what exact prefix matching costs the router per request.

Replays growing chat sessions (round robin, each turn = the history + an assistant reply + a user
message, as clients re-send conversations) over ``--replicas`` replicas whose event-fed indexes hold every
earlier turn's blocks, and times, per request, everything `RequestFeatures.kv_match` does on first use:
render the chat template, tokenize (with the prefix caches), hash the blocks and match every replica.
Prints one JSON line: p50/p99/max in ms for turns ("warm", history cached) and for first sight ("cold").
CPU time of this thread (``time.thread_time``), so other processes on a shared host do not inflate it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence

from kv_wire import BlockStored, KVEventBatch
from router.features.hashing import token_block_hashes
from router.features.tokenize import load_tokenizer
from router.kv_events.precise import PreciseIndex
from router.kv_events.prefix_source import PrefixSource

WORDS = ("cache", "block", "router", "engine", "prefix", "token", "the", "of", "and", "model", "batch",
         "queue", "stream", "latency", "replica", "memory", "request", "system", "value", "result")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 4)


def _store(index: PreciseIndex, ids: list[int], seqs: dict[str, int]) -> None:
    """Every replica caches the prompt's full blocks (engine hash = our key: the index re-keys anyway)."""
    for name in index.names():
        sync = index.replica(name)
        assert sync is not None
        bs, model = sync.index.block_size, sync.index.model
        keys = token_block_hashes(ids, bs, model)
        ev = BlockStored(block_hashes=list(keys), parent_block_hash=None, token_ids=ids[: len(keys) * bs],
                         block_size=bs, lora_id=None, medium="GPU", lora_name=None)
        sync.on_live(seqs[name], KVEventBatch(ts=float(seqs[name]), events=[ev]))
        seqs[name] += 1


def run(tokenizer: str, replicas: int, tokens: int, sessions: int, turns: int, block_size: int,
        seed: int = 0) -> dict[str, object]:
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
    system = _text(rng, 200)
    # Each session starts at ~ `tokens` minus the growth of its turns, so the measured turns are ~ tokens.
    chats = []
    for _ in range(sessions):
        msgs = [{"role": "system", "content": system}]
        while True:
            ids = tok.prompt_ids({"messages": msgs}, "chat") or []
            if len(ids) >= tokens - 60 * turns:
                break
            msgs += [{"role": "user", "content": _text(rng, 150)}, {"role": "assistant", "content": _text(rng, 150)}]
        chats.append(msgs)
    cold: list[float] = []
    warm: list[float] = []
    lengths: list[int] = []
    for turn in range(turns):
        for s in range(sessions):
            chats[s] = chats[s] + [{"role": "user", "content": _text(rng, 30)}]
            body = {"messages": chats[s]}
            t0 = time.thread_time()
            m = source.for_request(body, "chat")
            matches = m.match()
            dt = time.thread_time() - t0
            (cold if turn == 0 else warm).append(dt)
            ids = m.token_ids or []
            lengths.append(len(ids))
            assert len(matches) == replicas
            _store(index, ids, seqs)
            chats[s] = chats[s] + [{"role": "assistant", "content": _text(rng, 30)}]
    return {"tokenizer": tokenizer, "replicas": replicas, "block_size": block_size,
            "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
            "cold_ms": {"p50": _pct(cold, 0.5), "p99": _pct(cold, 0.99), "max": _pct(cold, 1.0), "n": len(cold)},
            "warm_ms": {"p50": _pct(warm, 0.5), "p99": _pct(warm, 0.99), "max": _pct(warm, 1.0), "n": len(warm)}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router.kv_events.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="sim", help="sim, or a model path / hub id (default sim)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length of the measured turns")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=40)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args(argv)
    print(json.dumps(run(args.tokenizer, args.replicas, args.tokens, args.sessions, args.turns,
                         args.block_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
