"""Does `cost`'s candidate pre-filter pick what the full scan picks? (router/policies/candidates.py)

    python -m benchmarks.candidates_check --replicas 64 --workloads gsp multiturn agentic

Two views of the same question, both with the offline simulator (`benchmarks.simulate`) on the
benchmark workloads (`benchmarks.workloads`):

- per decision: a shadow policy prices the whole fleet and then the pre-filtered candidates on the same
  state (the random tie-break replayed from the same seed state), and counts where they differ, and
  where the pre-filter's pick costs more than the tie tolerance above the full scan's minimum;
- end to end: the same run with the pre-filter (``candidates=8``) and without (``candidates=0``),
  comparing TTFT and the prefix-cache hit rate.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from benchmarks.lib import workloads as wl
from benchmarks.lib.loadgen import LoadSpec
from benchmarks.simulate import simulate
from router.features.parse import RequestFeatures
from router.policies.base import Decision
from router.policies.cost import Cost
from router.replica_view import ReplicaView

SCALE = {"gsp": lambda s: {"groups": 16 * s}, "multiturn": lambda s: {"conversations": 16 * s},
         "agentic": lambda s: {"sessions": 24 * s}}


class ShadowCost(Cost):
    """`Cost` that also prices the whole fleet for every decision and counts disagreements."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decisions = self.differ = self.costlier = 0

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        k, state = self.candidates.k, self.rng.getstate()
        self.candidates.k = 0
        full = super().choose(features, replicas)
        self.candidates.k = k
        self.rng.setstate(state)
        filtered = super().choose(features, replicas)
        self.decisions += 1
        if filtered.replica != full.replica:
            self.differ += 1
            assert full.scores is not None
            if full.scores[filtered.replica] > min(full.scores.values()) * (1.0 + self.tie_tolerance):
                self.costlier += 1
        return filtered


def run(workload: wl.Workload, replicas: int, concurrency: int, k: int) -> dict[str, Any]:
    load = LoadSpec(concurrency=concurrency, max_requests=workload.num_requests, max_s=3600.0, seed=1)
    shadow = ShadowCost(seed=1, candidates=k)
    simulate(workload, replicas, "cost", policy=shadow, load=load, seed=1, keep_itl=False)
    runs = {c: simulate(workload, replicas, "cost", {"candidates": c}, load=load, seed=1, keep_itl=False)
            for c in (0, k)}
    out: dict[str, Any] = {"workload": workload.name, "replicas": replicas, "decisions": shadow.decisions,
                           "differ": shadow.differ, "costlier": shadow.costlier}
    for c, r in runs.items():
        s = r.summary()
        out[f"k={c}"] = {"ttft_ms": s["ttft_ms"], "hit_rate": s["hit_rate"], "cpu_s": round(r.cpu_s, 2)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.candidates_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=96)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--workloads", nargs="+", default=["gsp", "multiturn", "agentic"])
    p.add_argument("--scale", type=int, default=4, help="workload size multiplier (groups/conversations)")
    args = p.parse_args(argv)
    for name in args.workloads:
        for workload in wl.build(name, seed=1, **SCALE[name](args.scale)):
            print(run(workload, args.replicas, args.concurrency, args.k), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
