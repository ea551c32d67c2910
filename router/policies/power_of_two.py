"""power_of_two: sample two distinct replicas at random and send to the less loaded one.

Algorithm: ``rng.sample(replicas, 2)``, then the lower `least_load.load_key` (requests, then tokens; the
engine's fresh report raises the router's counts). With a single replica it is chosen directly. Cheaper
to keep consistent across many router replicas than a global minimum, and avoids herding onto the one
least-loaded replica when load signals lag.

Parameters:
    seed / rng: the sampling random source.
Reason labels: ``"power_of_two"``, or ``"only_replica"``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.features.parse import RequestFeatures
from router.policies.base import Decision, PolicyBase, require_replicas
from router.policies.least_load import load_key
from router.replica_view import ReplicaView


class PowerOfTwo(PolicyBase):
    name = "power_of_two"

    def __init__(
        self,
        *,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(seed=seed, rng=rng)

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        if len(replicas) == 1:
            return Decision(replica=replicas[0].name, reason="only_replica")
        a, b = self.rng.sample(list(replicas), 2)
        pick = b if load_key(b) < load_key(a) else a
        return Decision(replica=pick.name, reason="power_of_two")
