"""Conversations resident per replica, so that new ones spread instead of following a shared system prompt.

Why: a chat's later turns go where its history is cached, so where its *first* turn lands decides where
the whole conversation runs. A first turn's only hit is the system prompt every conversation shares, held
(at first) by one replica; ``cost`` prices that hit against the load of the moment, so on an idle or
unevenly busy fleet conversation after conversation starts on the holder, and that replica stays hot for
as long as they last (benchmarks/README.md, "KV events (issue 14)": max/mean 1.4-1.5 live, and 1.25-2.25
in the simulator with Poisson arrivals). The shared prefix is worth one prefill per replica, paid once;
the conversation's placement is paid on every later turn.

The rule (`spread`): a request that continues no thread known to this module starts one. Among the
replicas whose cost is within a margin of the cheapest, the one with the fewest resident threads takes it,
then the cheaper. ``cost`` sets the margin: the prefill of the prompt's deepest match (what the hit saves,
once), at most the prefill the thread's later turns are expected to bring (balancing is worth recomputing
no more than the work it places; 0 where prompts have no later turns). A continuing turn, or a prompt
nobody holds any of, is decided by the costs as before.

A burst of first turns that comes before any later turn (the margin still 0: nothing has shown yet that
prompts here continue) is spread by the costs alone, each queued first turn making its replica dearer by
its prefill, as the simulator shows. Live, the burst piled up (3/2/2/1 conversations on 4 replicas) only
because a load report taken during a warm-up request still counted it as running; `cost` now takes our
finished requests off a report's ``running`` (``Cost._reported_running``).

A thread is the chain of prompts that each extend the previous one's last block (its *tip*); its
replica is where its last prompt went. Only the ``capacity`` most recently extended threads are kept, so
conversations that stopped long ago age out as new ones arrive.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence

from router.replica_view import ReplicaView

DEFAULT_CAPACITY = 4096  # live threads remembered (fleet-wide)


class Threads:
    """Tips of the threads this policy placed: tip block hash -> replica; and the count per replica."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._tips: OrderedDict[int, str] = OrderedDict()
        self.resident: Counter[str] = Counter()

    def continued(self, hashes: Sequence[int]) -> int | None:
        """The tip this prompt extends (the deepest earlier prompt's last block in its chain), or None."""
        tips = self._tips
        for h in reversed(hashes):
            if h in tips:
                return h
        return None

    def dispatched(self, replica: str, hashes: Sequence[int]) -> bool:
        """Record that the prompt ``hashes`` went to ``replica``: it moves its thread's tip there (True), or
        starts one (False)."""
        if not hashes:
            return False
        tips = self._tips
        tip = self.continued(hashes)
        if tip is not None:
            self.resident[tips.pop(tip)] -= 1
        new = hashes[-1]
        old = tips.pop(new, None)  # the same prompt again: one thread, not two
        if old is not None:
            self.resident[old] -= 1
        tips[new] = replica
        self.resident[replica] += 1
        while len(tips) > self.capacity:
            _, gone = tips.popitem(last=False)
            self.resident[gone] -= 1
        return tip is not None

    def forget(self, replica: str) -> None:
        for h in [h for h, r in self._tips.items() if r == replica]:
            del self._tips[h]
        self.resident.pop(replica, None)


def spread(priced: Sequence[ReplicaView], costs: Mapping[str, float], matched: Mapping[str, int],
           hit_s: Callable[[int], float], resident: Mapping[str, int], tolerance: float) -> ReplicaView | None:
    """The replica a new thread goes to, or None when the costs decide (no hit anywhere, or one candidate).
    ``hit_s(blocks)`` is the prefill cost of ``blocks`` matched blocks: the margin within which the
    fewest resident threads wins (and ``tolerance``, relative, the policy's tie tolerance)."""
    deepest = max((matched.get(v.name, 0) for v in priced), default=0)
    if deepest == 0 or len(priced) < 2:
        return None
    cheapest = min(costs[v.name] for v in priced)
    near = [v for v in priced if costs[v.name] <= (cheapest + hit_s(deepest)) * (1.0 + tolerance)]
    if len(near) < 2:
        return None
    return min(near, key=lambda v: (resident.get(v.name, 0), costs[v.name]))
