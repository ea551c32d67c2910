"""random: each request goes to a replica drawn at random, in proportion to ``weight``.

Algorithm: ``rng.choices(replicas, weights)``; with equal weights, ``rng.choice``.

Parameters: ``seed`` / ``rng`` (the random source; seed it for reproducible runs).
Reason label: ``"random"``. Ignores load and prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.features.parse import RequestFeatures
from router.policies.base import Decision, PolicyBase, require_replicas
from router.replica_view import ReplicaView


class RandomChoice(PolicyBase):
    name = "random"

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        first = replicas[0].weight
        if all(r.weight == first for r in replicas):
            replica = self.rng.choice(replicas)
        else:
            replica = self.rng.choices(replicas, weights=[max(r.weight, 0.0) for r in replicas])[0]
        return Decision(replica=replica.name, reason="random")
