"""`PrefixIndex`: which replica has recently been sent which prompt prefix, as bounded LRUs of block hashes.

An approximation of each engine's prefix cache, built from what the router dispatched. Entries are the
chained block hashes of `router.features.hashing`, so a hash stands for a whole prefix and the number of
blocks a replica "has" for a prompt is the length of the run of the prompt's hashes it holds, counted
from the first block.

Layout, chosen so that `match` costs one dict lookup per matched block whatever the number of replicas:

- ``hash -> bitmask`` of the replicas holding it (a replica is a bit slot; slots are reused), split
  into `OWNER_SHARDS` dicts by the hash's low bits: one dict of millions of entries stalls the router for
  17-85 ms each time it grows or sheds its deleted slots (an index at capacity churns), a shard for 1/64
  of that;
- one ``OrderedDict`` LRU per replica with its own capacity in blocks (`set_capacity`).

`add` touches a chain from its last block to its first, so the first blocks are the most recent and
eviction removes the deepest blocks of the oldest chains first; evicting a chain's root first would make
the rest of it useless. `match` never changes recency: deciding is not using.

Worked example (mirrored by ``tests/router/test_prefix_index.py``)::

    >>> index = PrefixIndex(default_capacity=4)
    >>> index.add("a", (1, 2, 3))       # "a" was sent a prompt with blocks 1, 2, 3
    >>> index.add("b", (1, 2, 9))       # "b" shares blocks 1, 2, then diverges
    >>> index.match((1, 2, 3, 4))       # contiguous blocks from the start, per replica
    {'b': 2, 'a': 3}
    >>> index.match((7, 1, 2))          # a gap at the start means no match at all
    {}
    >>> index.add("a", (5, 6))          # "a" is now over capacity: its oldest, deepest block (3) goes
    >>> index.blocks("a")
    [2, 1, 6, 5]
    >>> index.match((1, 2, 3))
    {'a': 2, 'b': 2}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_CAPACITY_BLOCKS = 1 << 20  # 64 Mi characters at 64 characters per block, per replica
OWNER_SHARDS = 64  # a power of two: a hash's shard is ``hash & SHARD_MASK``
SHARD_MASK = OWNER_SHARDS - 1


class PrefixIndex:
    """Per-replica bounded LRU sets of block hashes with a shared reverse map for fast prefix matching."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        if default_capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.default_capacity = default_capacity
        # block hash -> bitmask of replica slots, in the shard ``hash & SHARD_MASK``
        self._owners: list[dict[int, int]] = [{} for _ in range(OWNER_SHARDS)]
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self._slot: dict[str, int] = {}
        self._names: list[str | None] = []  # slot -> replica name; None = free

    # -- writes ------------------------------------------------------------------------------------

    def add(self, replica: str, hashes: Sequence[int], held: int = 0) -> None:
        """Record that ``replica`` now caches the chain ``hashes`` (refreshing what it already had).

        ``held``: how many leading blocks the caller believes ``replica`` holds (the match it decided
        on); those are only refreshed, not looked up first. A wrong belief costs time, never the result.
        """
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._register(replica)
        capacity = self._capacity[replica]
        if len(hashes) > capacity:  # the deepest blocks would be evicted at once; skip them
            hashes = hashes[:capacity]
        if held > len(hashes):
            held = len(hashes)
        bit = 1 << self._slot[replica]
        self._touch(lru, bit, hashes[held:] if held else hashes)
        if held:
            move_to_end = lru.move_to_end
            try:
                for h in reversed(hashes[:held]):
                    move_to_end(h)
            except KeyError:  # not all held after all: the careful way (re-touching gives the same order)
                self._touch(lru, bit, hashes[:held])
        self._evict(replica, lru, capacity)

    def discard(self, replica: str, hashes: Iterable[int]) -> int:
        """Forget these blocks for ``replica`` (e.g. the engine reported it no longer has them).
        Returns how many were present."""
        lru = self._lru.get(replica)
        if lru is None:
            return 0
        mask = ~(1 << self._slot[replica])
        removed = 0
        for h in hashes:
            if h in lru:
                del lru[h]
                self._clear(h, mask)
                removed += 1
        return removed

    def set_capacity(self, replica: str, capacity: int) -> None:
        """Bound ``replica``'s LRU to ``capacity`` blocks, evicting at once if it is over."""
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._register(replica)
        self._capacity[replica] = capacity
        self._evict(replica, lru, capacity)

    def remove_replica(self, replica: str) -> None:
        """Forget ``replica`` entirely: its entries, its capacity and its bit slot."""
        lru = self._lru.pop(replica, None)
        if lru is None:
            return
        slot = self._slot.pop(replica)
        mask = ~(1 << slot)
        for h in lru:
            self._clear(h, mask)
        del self._capacity[replica]
        self._names[slot] = None

    # -- reads -------------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """``{replica: number of leading blocks of hashes it holds}`` for every replica holding >= 1.

        Walks the chain once and stops at the first block no remaining replica holds.
        """
        if not hashes:
            return {}
        shards = self._owners
        first = hashes[0]
        alive = shards[first & SHARD_MASK].get(first, 0)
        if not alive:
            return {}
        result: dict[str, int] = {}
        depth = 1
        for h in hashes[1:]:
            holders = shards[h & SHARD_MASK].get(h, 0) & alive
            if holders != alive:
                self._record(alive & ~holders, depth, result)
                alive = holders
                if not alive:
                    return result
            depth += 1
        self._record(alive, depth, result)
        return result

    def match_masks(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """`match` as ``[(depth, bitmask of the replicas holding exactly that many leading blocks)]``,
        deepest first, without naming the holders: a prompt held by hundreds of replicas costs one
        integer AND per block, and a caller wanting a few of the holders picks them out of the masks
        (`bit`, `names`)."""
        if not hashes:
            return []
        shards = self._owners
        first = hashes[0]
        alive = shards[first & SHARD_MASK].get(first, 0)
        if not alive:
            return []
        groups: list[tuple[int, int]] = []
        depth = 1
        for h in hashes[1:]:
            holders = shards[h & SHARD_MASK].get(h, 0) & alive
            if holders != alive:
                groups.append((depth, alive & ~holders))
                alive = holders
                if not alive:
                    groups.reverse()
                    return groups
            depth += 1
        groups.append((depth, alive))
        groups.reverse()
        return groups

    def bit(self, replica: str) -> int:
        """``replica``'s bit in the masks of `match_masks` (0 for a replica the index does not know).
        A bit is reused after `remove_replica`."""
        slot = self._slot.get(replica)
        return 0 if slot is None else 1 << slot

    def names(self, mask: int) -> list[str]:
        """The replicas whose bits are set in ``mask``, highest slot first."""
        names, out = self._names, []
        while mask:
            top = mask.bit_length() - 1
            name = names[top]
            if name is not None:
                out.append(name)
            mask ^= 1 << top
        return out

    def capacity(self, replica: str) -> int:
        """The LRU bound of ``replica`` in blocks (the default for replicas never seen)."""
        return self._capacity.get(replica, self.default_capacity)

    def headroom(self, replica: str) -> int:
        """Blocks ``replica``'s LRU can take before it evicts: `capacity` minus `size` (one lookup each,
        for a policy pricing evictions on every decision)."""
        lru = self._lru.get(replica)
        return self._capacity.get(replica, self.default_capacity) - (0 if lru is None else len(lru))

    def size(self, replica: str | None = None) -> int:
        """Blocks held by ``replica``, or distinct blocks held by anyone when ``replica`` is None."""
        if replica is None:
            return sum(map(len, self._owners))
        lru = self._lru.get(replica)
        return 0 if lru is None else len(lru)

    def replicas(self) -> list[str]:
        """Replicas the index knows, in registration order."""
        return list(self._lru)

    def blocks(self, replica: str) -> list[int]:
        """``replica``'s blocks from least to most recently used (for tests and debugging)."""
        return list(self._lru.get(replica, ()))

    def holders(self, block: int) -> set[str]:
        """Replicas holding ``block`` (for tests and debugging)."""
        out: dict[str, int] = {}
        self._record(self._owners[block & SHARD_MASK].get(block, 0), 1, out)
        return set(out)

    # -- internals ---------------------------------------------------------------------------------

    def _touch(self, lru: OrderedDict[int, None], bit: int, hashes: Sequence[int]) -> None:
        """Make ``hashes`` the most recent entries of ``lru``, its first block last (most recent)."""
        shards = self._owners
        move_to_end = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                move_to_end(h)
            else:
                lru[h] = None
                owners = shards[h & SHARD_MASK]
                owners[h] = owners.get(h, 0) | bit

    def _register(self, replica: str) -> OrderedDict[int, None]:
        try:
            slot = self._names.index(None)
            self._names[slot] = replica
        except ValueError:
            slot = len(self._names)
            self._names.append(replica)
        self._slot[replica] = slot
        self._capacity.setdefault(replica, self.default_capacity)
        lru: OrderedDict[int, None] = OrderedDict()
        self._lru[replica] = lru
        return lru

    def _evict(self, replica: str, lru: OrderedDict[int, None], capacity: int) -> None:
        over = len(lru) - capacity
        if over <= 0:
            return
        mask = ~(1 << self._slot[replica])
        popitem = lru.popitem
        for _ in range(over):
            h, _ = popitem(last=False)
            self._clear(h, mask)

    def _clear(self, h: int, mask: int) -> None:
        owners = self._owners[h & SHARD_MASK]
        remaining = owners[h] & mask
        if remaining:
            owners[h] = remaining
        else:
            del owners[h]

    def _record(self, bits: int, depth: int, out: dict[str, int]) -> None:
        names = self._names
        while bits:
            low = bits & -bits
            name = names[low.bit_length() - 1]
            if name is not None:
                out[name] = depth
            bits ^= low
