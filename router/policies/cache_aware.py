"""cache_aware: SGLang-router-style approximate prefix affinity with a load-imbalance escape hatch.

Kept faithful to SGLang's algorithm and defaults so it can serve as the peer baseline; its known failure
mode (one shared system prompt pins every conversation to one replica, because the balance trigger never
fires at modest concurrency) is reproduced by the tests on purpose. Use ``cost`` instead.

Algorithm, per request:
    1. Imbalance check on the router's in-flight request counts: if ``max - min > balance_abs_threshold``
       AND ``max > balance_rel_threshold * min``, go to the least-loaded replica.
    2. Otherwise match the prompt's block chain against a per-replica prefix index (updated on dispatch,
       LRU-bounded). If the best match ratio (matched blocks / prompt blocks) exceeds
       ``cache_threshold``, go to the best-matching replica (ties: fewer in-flight, then random).
    3. Otherwise go to the replica with the smallest index ("most free cache"; ties: random).

Parameters:
    cache_threshold (0.3): minimum match ratio to follow the cache.
    balance_abs_threshold (64): in-flight request gap that may count as imbalance.
    balance_rel_threshold (1.5): max/min ratio that must also be exceeded.
    capacity_blocks (2**20): per-replica index bound in blocks (64 Mi characters, like SGLang's
        default tree bound in characters).
    seed / rng: tie-break random source.
Reason labels: ``"imbalanced"``, ``"cache_hit"``, ``"smallest_tree"``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.features.parse import RequestFeatures
from router.policies.base import Decision, PolicyBase, pick_lowest, require_replicas
from router.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from router.replica_view import ReplicaView


class CacheAware(PolicyBase):
    name = "cache_aware"

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(seed=seed, rng=rng)
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.index = PrefixIndex(default_capacity=capacity_blocks)

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        loads = [r.in_flight_requests for r in replicas]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            pick = pick_lowest(replicas, lambda r: r.in_flight_requests, self.rng)
            return Decision(replica=pick.name, reason="imbalanced")

        hashes = features.block_hashes
        matched = self.index.match(hashes)
        best = max((matched.get(r.name, 0) for r in replicas), default=0)
        if hashes and best / len(hashes) > self.cache_threshold:
            holders = [r for r in replicas if matched.get(r.name, 0) == best]
            pick = pick_lowest(holders, lambda r: r.in_flight_requests, self.rng)
            return Decision(replica=pick.name, reason="cache_hit", matched_blocks=best)

        pick = pick_lowest(replicas, lambda r: self.index.size(r.name), self.rng)
        return Decision(replica=pick.name, reason="smallest_tree", matched_blocks=matched.get(pick.name, 0))

    def on_dispatch(self, features: RequestFeatures, decision: Decision) -> None:
        self.index.add(decision.replica, features.block_hashes)

    def on_replica_removed(self, name: str) -> None:
        self.index.remove_replica(name)

    def index_size(self, name: str) -> int:
        """Blocks the index believes ``name`` holds (read by the admin API; not part of `Policy`)."""
        return self.index.size(name)
