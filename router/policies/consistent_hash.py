"""consistent_hash: consistent hashing with bounded loads (CHWBL) on a session or prompt-prefix key.

Algorithm:
    1. Key: ``features.affinity_key`` when present (session header or OpenAI ``user``), else the chain
       hash of block ``min(prefix_blocks, n) - 1`` of the prompt (it stands for the whole prefix up to
       there), else the request id (prompts under one block spread like random).
    2. Each replica owns ``vnodes`` points on a 64-bit ring (XXH3-64 of ``"name#i"``). The ring is
       rebuilt only when membership changes, never per request.
    3. Walk clockwise from the key's point. The first eligible replica whose load after taking this
       request stays within ``ceil(avg * load_factor * weight_share * n)`` wins, where
       ``avg = (total load + 1) / n`` over the eligible replicas. With equal weights some replica always
       fits, so a hot key spills to its ring successors instead of piling up on one replica.
    Load is the router's in-flight count, raised to the engine's running + waiting when fresh.

Parameters:
    vnodes (160): points per replica; more = smoother key distribution, slower rebuilds.
    load_factor (1.25): the bound's slack over the mean (``1 + eps`` with eps = 0.25).
    prefix_blocks (16): how many leading blocks form the prompt key (16 x 64 chars ~ 256 tokens).
    seed / rng: tie-break random source (only used if no replica fits the bound, then least load wins).
Reason labels: ``"ring"`` (the key's owner), ``"ring_overflow"`` (a successor, the owner was full),
``"least_load"`` (nothing fit, e.g. with skewed weights).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence

from xxhash import xxh3_64_intdigest

from router.features.parse import RequestFeatures
from router.policies.base import Decision, PolicyBase, pick_lowest, require_replicas
from router.policies.least_load import load_key
from router.replica_view import ReplicaView


class ConsistentHash(PolicyBase):
    name = "consistent_hash"

    def __init__(
        self,
        *,
        vnodes: int = 160,
        load_factor: float = 1.25,
        prefix_blocks: int = 16,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(seed=seed, rng=rng)
        if vnodes < 1 or prefix_blocks < 1 or load_factor < 1.0:
            raise ValueError("vnodes and prefix_blocks must be >= 1, load_factor >= 1.0")
        self.vnodes = vnodes
        self.load_factor = load_factor
        self.prefix_blocks = prefix_blocks
        self._members: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []

    def on_replica_added(self, name: str) -> None:
        if name not in self._members:
            self._members.add(name)
            self._rebuild()

    def on_replica_removed(self, name: str) -> None:
        if name in self._members:
            self._members.discard(name)
            self._rebuild()

    def key_of(self, features: RequestFeatures) -> int:
        """The 64-bit ring position of a request (see step 1)."""
        if features.affinity_key:
            return xxh3_64_intdigest(features.affinity_key.encode("utf-8"))
        if features.block_hashes:
            return features.block_hashes[min(self.prefix_blocks, len(features.block_hashes)) - 1]
        return xxh3_64_intdigest(features.request_id.encode("utf-8"))

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        by_name = {r.name: r for r in replicas}
        if not by_name.keys() <= self._members:  # replicas nobody announced still join the ring
            self._members |= by_name.keys()
            self._rebuild()
        loads = {r.name: r.request_load() for r in replicas}
        total_weight = sum(max(r.weight, 0.0) for r in replicas) or float(len(replicas))
        avg = (sum(loads.values()) + 1) / len(replicas)
        points, owners = self._points, self._owners
        start = bisect.bisect_right(points, self.key_of(features))
        seen: set[str] = set()
        for step in range(len(points)):
            name = owners[(start + step) % len(points)]
            if name in seen or name not in by_name:
                continue
            seen.add(name)
            share = max(by_name[name].weight, 0.0) / total_weight * len(replicas)
            if loads[name] + 1 <= math.ceil(avg * self.load_factor * share):
                return Decision(replica=name, reason="ring" if len(seen) == 1 else "ring_overflow")
            if len(seen) == len(by_name):
                break
        pick = pick_lowest(replicas, load_key, self.rng)
        return Decision(replica=pick.name, reason="least_load")

    def _rebuild(self) -> None:
        ring = sorted(
            (xxh3_64_intdigest(f"{name}#{i}".encode()), name)
            for name in self._members
            for i in range(self.vnodes)
        )
        self._points = [p for p, _ in ring]
        self._owners = [n for _, n in ring]
