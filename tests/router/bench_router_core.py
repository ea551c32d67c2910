"""Microbenchmarks of the routing core (not collected by pytest): run
``.venv/bin/python tests/router/bench_router_core.py``.

Measures block hashing of a 100k-character prompt and ``choose()`` of the prefix-aware policies with
100k prefixes indexed (1,000 system prompts x 100 questions over 8 replicas).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from router.features import HashingConfig, block_hashes, features_from_text  # noqa: E402
from router.policies import create_policy  # noqa: E402
from router.replica_view import ReplicaView  # noqa: E402

H = HashingConfig()


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return sorted(out)


def pct(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6


def bench_hashing() -> None:
    text = "".join(random.Random(0).choices("abcdefghij klmnop", k=100_000))
    s = timed(lambda: block_hashes(text, 64, "m"), 300)
    print(f"block_hashes 100k chars: p50 {pct(s, 0.5):.0f} us, p99 {pct(s, 0.99):.0f} us")


def bench_choose(policy_name: str) -> None:
    rng = random.Random(1)
    systems = ["".join(rng.choices("abcdefghij klmnop", k=1920)) for _ in range(1000)]  # 30 blocks
    replicas = [
        ReplicaView(f"r{i}", f"http://r{i}", load_age_s=0.1, kv_blocks_total=200_000, block_size=16)
        for i in range(8)
    ]
    policy = create_policy(policy_name, seed=0)
    t0 = time.perf_counter()
    for q in range(100):
        for s, system in enumerate(systems):
            f = features_from_text(system + f" question {q:04d} " + "x" * 240, "m", f"{s}-{q}", H)
            policy.on_dispatch(f, type(policy.choose(f, replicas))(replica=f"r{(s + q) % 8}", reason="bench"))
    fill = time.perf_counter() - t0
    probes = [
        features_from_text(rng.choice(systems) + " a new question " + "y" * 240, "m", "p", H)
        for _ in range(2000)
    ]
    it = iter(probes * 2)
    s = timed(lambda: policy.choose(next(it), replicas), 2000)
    print(
        f"{policy_name:12s} choose() with 100k indexed prefixes over 8 replicas: "
        f"p50 {pct(s, 0.5):.1f} us, p99 {pct(s, 0.99):.1f} us, mean {statistics.fmean(s) * 1e6:.1f} us "
        f"(fill {fill:.1f} s, index {policy.index.size()} blocks)"
    )


if __name__ == "__main__":
    bench_hashing()
    for name in ("cost", "cache_aware"):
        bench_choose(name)
