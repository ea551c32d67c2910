"""least_load: each request goes to the replica with the fewest requests, then the fewest queued tokens.

Algorithm: minimise ``(request_load / weight, in_flight_tokens / weight)`` with a seeded random
tie-break, where ``request_load`` is the router's in-flight request count, raised to the engine's
running + waiting when its load report is fresh (the engine also sees other routers' traffic). A stale
or missing report falls back to the router's count: it never reads as zero load.

Parameters:
    seed / rng: tie-break random source.
Reason label: ``"least_load"``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.features.parse import RequestFeatures
from router.policies.base import Decision, PolicyBase, pick_lowest, require_replicas
from router.replica_view import ReplicaView


def load_key(view: ReplicaView) -> tuple[float, float]:
    """Lexicographic load: weighted requests first, weighted not-yet-prefilled tokens second."""
    weight = view.weight if view.weight > 0 else 1.0
    return view.request_load() / weight, view.in_flight_tokens / weight


class LeastLoad(PolicyBase):
    name = "least_load"

    def __init__(
        self,
        *,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(seed=seed, rng=rng)

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        replica = pick_lowest(replicas, load_key, self.rng)
        return Decision(replica=replica.name, reason="least_load")
