"""`InFlightBlocks` (the exact modes' speculative insert) counts with a `Counter` per replica; it must hold
exactly what the plain per-hash version it replaced held, for any order of sends, completions and time."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence

import pytest

from router.policies.kv_match import InFlightBlocks


class Reference:
    """The previous implementation, verbatim but for the name: one ``[in flight, held until]`` per hash."""

    def __init__(self, hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self._held: dict[str, dict[int, list[float]]] = {}  # replica -> hash -> [in flight, held until]
        self._expiring: deque[tuple[float, str, Sequence[int]]] = deque()

    def add(self, replica: str, hashes: Sequence[int]) -> None:
        held = self._held.setdefault(replica, {})
        for h in hashes:
            entry = held.get(h)
            if entry is None:
                held[h] = [1, 0.0]
            else:
                entry[0] += 1

    def remove(self, replica: str, hashes: Sequence[int]) -> None:
        """The request completed (or failed): its blocks are held ``hold_s`` longer, then dropped."""
        now = self.clock()
        self._expire(now)
        held = self._held.get(replica)
        if held is None:
            return
        until = now + self.hold_s
        for h in hashes:
            entry = held.get(h)
            if entry is not None:
                entry[0] = max(0, entry[0] - 1)
                entry[1] = max(entry[1], until)
        self._expiring.append((until, replica, hashes))

    def forget(self, replica: str) -> None:
        self._held.pop(replica, None)

    def match(self, replica: str, hashes: Sequence[int]) -> int:
        held = self._held.get(replica)
        if not held:
            return 0
        now = self.clock()
        n = 0
        for h in hashes:
            entry = held.get(h)
            if entry is None or (entry[0] == 0 and entry[1] <= now):
                break
            n += 1
        return n

    def _expire(self, now: float) -> None:
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            _, replica, hashes = expiring.popleft()
            held = self._held.get(replica)
            if held is None:
                continue
            for h in hashes:
                entry = held.get(h)
                if entry is not None and entry[0] == 0 and entry[1] <= now:
                    del held[h]
            if not held:
                del self._held[replica]


@pytest.mark.parametrize("hold_s", [0.0, 0.5])
def test_counter_version_holds_what_the_per_hash_version_held(hold_s):
    rng = random.Random(0)
    now = [0.0]
    fast, ref = InFlightBlocks(hold_s, lambda: now[0]), Reference(hold_s, lambda: now[0])
    chains = [tuple(rng.randrange(30) for _ in range(rng.randrange(1, 12))) for _ in range(20)]
    sent: list[tuple[str, tuple[int, ...]]] = []
    for _ in range(3000):
        replica = rng.choice("abc")
        op = rng.random()
        if op < 0.4:
            chain = rng.choice(chains)
            fast.add(replica, chain)
            ref.add(replica, chain)
            sent.append((replica, chain))
        elif op < 0.7 and sent:
            replica, chain = sent.pop(rng.randrange(len(sent)))
            fast.remove(replica, chain)
            ref.remove(replica, chain)
        elif op < 0.75:
            fast.forget(replica)
            ref.forget(replica)
        else:
            now[0] += rng.choice((0.0, 0.1, 0.3))
        probe = rng.choice(chains)
        assert fast.match(replica, probe) == ref.match(replica, probe)
