"""round_robin: each request goes to the next replica in turn.

Algorithm: a counter advances on every ``choose`` and indexes the eligible replicas in the order the
dispatcher passes them. It advances in ``choose`` (not ``on_dispatch``) so that concurrent requests decided
before either is dispatched still rotate; a request that is never sent merely skips one turn.

Parameters: ``seed`` / ``rng`` (unused, accepted for a uniform constructor).
Reason label: ``"rotation"``. Ignores load and prefixes: the baseline every other policy must beat.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.features.parse import RequestFeatures
from router.policies.base import Decision, PolicyBase, require_replicas
from router.replica_view import ReplicaView


class RoundRobin(PolicyBase):
    name = "round_robin"

    def __init__(self, *, seed: int | None = None, rng: random.Random | None = None) -> None:
        super().__init__(seed=seed, rng=rng)
        self._counter = 0

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        replica = replicas[self._counter % len(replicas)]
        self._counter += 1
        return Decision(replica=replica.name, reason="rotation")
