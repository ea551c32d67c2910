"""`CandidateFilter`: the few replicas of a large fleet worth pricing for one request.

Pricing every replica costs ``cost`` a few microseconds each (~4.5 ms a decision at 1,000 replicas).
The replica the full scan picks is, in practice, one holding the prompt as deep as it is held anywhere
(least prefill) or one of the least loaded (least queue and crowding). So only those are priced:

- holders: at most ``k`` replicas holding the prompt, deepest match first, the least loaded within a
  depth (then the least recently sent to);
- least loaded: the ``k`` least loaded replicas of the fleet.

"Load" is the order of cost's own tie-break: ``request_load / weight`` (the router's in-flight count,
raised to the engine's fresh running + waiting, which is what every load term of the cost grows with:
queue, crowding, and the slot wait once in-flight reaches the engine's limit), then the replica sent to
least recently. The second key matters on an idle fleet: every replica then costs the same, the full
scan goes round them all by "least recently sent", and so does this order.

Nothing here walks the fleet or a prompt's holders per decision. The order is kept incrementally twice:
a lazy min-heap (for the fleet's least loaded; the few entries a decision reads stay out of it, in a
sorted front, instead of being pushed back) and one bitmask per load value in the prefix index's
replica bits (for the holders: the index gives a prompt's holders as one mask per match depth,
`PrefixIndex.match_masks`, and ANDing it with the masks in load order names only the few taken). A
replica's key is re-read from its view whenever it is priced, moved by +1/-1 on dispatch and completion
(the router's in-flight count moves the same way), and two replicas' keys are re-read from their views
each decision in turn round the fleet, so load that only the engine sees (other routers' traffic) is
picked up within ``len(fleet) / 2`` decisions. The first decision prices (and keys) the whole fleet.
Small fleets (``<= full_scan_below``) are always priced in full, the same result. Whenever the order
cannot give ``k`` eligible replicas cheaply (a fleet serving several models shares one order; many
replicas ejected at once), the whole fleet is priced: slower, never wrong.

On the benchmark workloads (`python -m benchmarks.candidates_check`, 64 replicas) ``k = 8`` never picked
a replica costing more than the full scan's choice (6-8 % of picks differ, all between equal costs) and
TTFT and hit rate were unchanged; ``k = 4`` did (agentic: 18 of 384, TTFT +6 %). At 1,000 replicas
(`benchmarks.router_micro`, a prompt held by 100 of them) a decision prices ``2 k`` replicas.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from typing import Protocol

from router.replica_view import ReplicaView

DEFAULT_K = 8
FRONT_MAX = 64  # least-loaded entries kept out of the heap between decisions (`_least`)
REKEY_PER_DECISION = 2  # keys re-read from the views per decision, in turn round the fleet
Key = tuple[float, int]  # (request load / weight, number of the dispatch that last went there; -1 never)
_NEVER: Key = (0.0, -1)  # a replica not in the order yet sorts first: it gets priced
Groups = Sequence[tuple[int, int]]  # (match depth, bitmask of the replicas holding it), deepest first


class HolderBits(Protocol):
    """What the filter needs of the prefix index: each replica's bit in its holder masks."""

    def bit(self, replica: str) -> int: ...
    def names(self, mask: int) -> list[str]: ...


class _NoBits:
    def bit(self, replica: str) -> int:
        return 0

    def names(self, mask: int) -> list[str]:
        return []


class CandidateFilter:
    """Incremental "least loaded" order plus the holders of a prompt, as views to price.

    k: replicas taken from the holders (deepest match first) and from the least-loaded order (0 disables
        the filter).
    bits: the prefix index the holder masks come from (`PrefixIndex.bit` / `names`).
    Engine reports are read as the views carry them: a stale one was dropped when the view was built.
    """

    def __init__(self, k: int = DEFAULT_K, bits: HolderBits | None = None) -> None:
        if k < 0:
            raise ValueError("candidate k must be >= 0")
        self.k = k
        self.full_scan_below = 4 * k  # at or below this many replicas, price them all
        self._bits: HolderBits = bits if bits is not None else _NoBits()
        self._key: dict[str, Key] = {}
        self._load: dict[str, tuple[int, int, float]] = {}  # name -> (in flight, engine load, weight)
        self._heap: list[tuple[float, int, str]] = []
        # The least entries taken off the heap by earlier decisions, sorted: `_least` reads them in place
        # instead of pushing them back (with the heap, every key's current entry is in one of the two).
        self._front: list[tuple[float, int, str]] = []
        self._positions: dict[tuple[int, str, str], dict[str, int]] = {}
        self._cursor = 0  # the next replica to re-key (a few per decision: every key re-read in turn)
        # The same order as bitmasks, for picking holders out of `match_masks` without naming them all:
        # load -> bits of the replicas at that load; the loads in order; every replica's bit (invariant:
        # a name is in _bit iff its bit is in _levels[its load] and in _tracked).
        self._bit: dict[str, int] = {}
        self._levels: dict[float, int] = {}
        self._order: list[float] = []
        self._tracked = 0

    def active(self, n: int) -> bool:
        return self.k > 0 and n > self.full_scan_below

    # -- choosing ----------------------------------------------------------------------------------

    def select(self, replicas: Sequence[ReplicaView], groups: Groups,
               last_sent: Mapping[str, int]) -> list[ReplicaView] | None:
        """The views to price, or None when the whole fleet should be priced: once per ``len(fleet)``
        decisions (the keys are then re-read from all views), or when the order is out of step.

        ``groups`` are the prompt's holders by match depth, deepest first (`PrefixIndex.match_masks`).
        At most ``k`` holders are taken, deepest first, the least loaded within a depth (then the least
        recently sent to), found through the per-load masks: a prompt held by hundreds of replicas costs
        a few integer ANDs, not a walk over its holders."""
        if not self._key:  # nothing keyed yet: one full pass keys every replica
            self.refresh(replicas, last_sent)
            return None
        positions = self._position_map(replicas)
        n = len(replicas)
        for _ in range(REKEY_PER_DECISION if n > REKEY_PER_DECISION else n):
            self._cursor = cursor = (self._cursor + 1) % n
            view = replicas[cursor]
            self.seen(view, last_sent.get(view.name, -1))
        picked: dict[str, ReplicaView] = {}
        if groups:
            self._holders(replicas, positions, groups, picked)
        least = self._least(self.k, replicas, positions, picked)
        if least is None:
            return None
        return [*picked.values(), *least]

    def select_matched(self, replicas: Sequence[ReplicaView], matched: Mapping[str, int],
                       last_sent: Mapping[str, int]) -> list[ReplicaView] | None:
        """`select` for matches given as ``{replica: depth}`` (blended with KV events): holders the
        index has no bit for are priced as well."""
        by_depth: dict[int, int] = {}
        loose: list[str] = []
        bit_of = self._bits.bit
        for name, depth in matched.items():
            bit = bit_of(name)
            if bit:
                by_depth[depth] = by_depth.get(depth, 0) | bit
            else:
                loose.append(name)
        chosen = self.select(replicas, sorted(by_depth.items(), reverse=True), last_sent)
        if chosen is None or not loose:
            return chosen
        have = {v.name for v in chosen}
        positions = self._position_map(replicas)
        for name in loose:
            view = self._lookup(replicas, positions, name) if name not in have else None
            if view is not None:
                chosen.append(view)
        return chosen

    def refresh(self, replicas: Sequence[ReplicaView], last_sent: Mapping[str, int]) -> None:
        """Re-read every key from ``replicas`` (forgetting replicas not among them) and rebuild the heap."""
        self._key.clear()
        self._load.clear()
        self._bit.clear()
        self._levels.clear()
        self._order.clear()
        self._tracked = 0
        positions: dict[str, int] = {}
        for i, view in enumerate(replicas):
            self._store(view, last_sent.get(view.name, -1))
            positions[view.name] = i
        self._heap = [(load, last, name) for name, (load, last) in self._key.items()]
        heapq.heapify(self._heap)
        self._front = []
        self._positions = {(len(replicas), replicas[0].name, replicas[-1].name): positions}
        self._cursor = 0

    # -- bookkeeping -------------------------------------------------------------------------------

    def seen(self, view: ReplicaView, last_sent: int) -> None:
        """``view`` was priced (or re-read in turn): its key is what the view says now."""
        name, flight = view.name, view.in_flight_requests
        engine = view.running + view.waiting if view.load_age_s is not None else 0
        weight = view.weight if view.weight > 0 else 1.0
        load = (flight, engine, weight)
        key = ((flight if flight > engine else engine) / weight, last_sent)
        old = self._key.get(name)
        if old == key and self._load.get(name) == load:
            return
        self._load[name] = load
        self._rekey(name, key)
        if key != old:
            self._push(name)

    def dispatched(self, name: str, last_sent: int) -> None:
        load = self._load.get(name)
        if load is None:
            return
        self._load[name] = (load[0] + 1, load[1], load[2])
        self._set(name, last_sent)

    def completed(self, name: str) -> None:
        load = self._load.get(name)
        if load is None or load[0] == 0:
            return
        self._load[name] = (load[0] - 1, load[1], load[2])
        key = self._key.get(name)
        self._set(name, -1 if key is None else key[1])

    def forget(self, name: str) -> None:
        key = self._key.pop(name, None)
        bit = self._bit.pop(name, 0)
        if bit and key is not None:
            self._unlevel(key[0], bit)
        self._load.pop(name, None)
        self._positions.clear()

    # -- internals ---------------------------------------------------------------------------------

    def _holders(self, replicas: Sequence[ReplicaView], positions: dict[str, int], groups: Groups,
                 picked: dict[str, ReplicaView]) -> None:
        """Up to ``k`` eligible holders into ``picked``: deepest first, least loaded within a depth.
        Holders the order does not track yet (no bit when last keyed) are all taken: they get keyed."""
        budget, names, key_of, levels = self.k, self._bits.names, self._key, self._levels
        tracked = self._tracked
        for _, mask in groups:
            untracked = mask & ~tracked
            if untracked:
                for name in names(untracked):
                    view = self._lookup(replicas, positions, name)
                    if view is not None:
                        picked[name] = view
                mask &= tracked
            for level in self._order:
                if budget <= 0:
                    return
                sub = mask & levels[level]
                if not sub:
                    continue
                found = names(sub)
                if len(found) > budget:  # least recently sent first, as cost's tie-break
                    ranked = sorted([(key_of.get(n, _NEVER)[1], n) for n in found])
                    found = [n for _, n in ranked[:budget]]
                for name in found:
                    view = self._lookup(replicas, positions, name)
                    if view is not None:
                        picked[name] = view
                        budget -= 1
                mask ^= sub
                if not mask:
                    break
            if budget <= 0:
                return

    def _store(self, view: ReplicaView, last_sent: int) -> None:
        engine = view.running + view.waiting if view.engine_fresh() else 0
        weight = view.weight if view.weight > 0 else 1.0
        self._load[view.name] = (view.in_flight_requests, engine, weight)
        self._rekey(view.name, (max(view.in_flight_requests, engine) / weight, last_sent))

    def _set(self, name: str, last_sent: int) -> None:
        flight, engine, weight = self._load[name]
        self._rekey(name, (max(flight, engine) / weight, last_sent))
        self._push(name)

    def _rekey(self, name: str, key: Key) -> None:
        """Set ``name``'s key and move its bit to the mask of its new load (its bit is looked up until
        the index knows it)."""
        old = self._key.get(name)
        self._key[name] = key
        bit = self._bit.get(name)
        if bit is None:
            bit = self._bits.bit(name)
            if bit:
                self._bit[name] = bit
                self._level(key[0], bit)
        elif old is None or old[0] != key[0]:
            if old is not None:
                self._unlevel(old[0], bit)
            self._level(key[0], bit)

    def _push(self, name: str) -> None:
        load, last = self._key[name]
        heap = self._heap
        heapq.heappush(heap, (load, last, name))
        if len(heap) > 4 * len(self._key) + 64:  # drop entries superseded since
            self._heap = [(lo, la, n) for n, (lo, la) in self._key.items()]
            heapq.heapify(self._heap)
            self._front = []

    def _level(self, load: float, bit: int) -> None:
        mask = self._levels.get(load)
        if mask is None:
            insort(self._order, load)
            self._levels[load] = bit
        else:
            self._levels[load] = mask | bit
        self._tracked |= bit

    def _unlevel(self, load: float, bit: int) -> None:
        mask = self._levels.get(load)
        if mask is None:
            return
        mask &= ~bit
        if mask:
            self._levels[load] = mask
        else:
            del self._levels[load]
            del self._order[bisect_left(self._order, load)]
        self._tracked &= ~bit

    def _least(self, k: int, replicas: Sequence[ReplicaView], positions: dict[str, int],
               picked: dict[str, ReplicaView]) -> list[ReplicaView] | None:
        """The k least loaded eligible views not already picked; None if too many heap entries are of
        replicas not among ``replicas`` (another model's, or ejected): then price the whole fleet."""
        heap, key_of, front = self._heap, self._key, self._front
        out: list[ReplicaView] = []
        kept: list[tuple[float, int, str]] = []
        names: set[str] = set()
        budget = 4 * k + 16
        used, ends = 0, len(front)  # front[:used] read so far
        while len(out) < k:  # the entries in key order: the lesser of the front's next and the heap's top
            if used < ends and (not heap or front[used] < heap[0]):
                entry = front[used]
                used += 1
            elif heap:
                entry = heapq.heappop(heap)
            else:
                break
            name = entry[2]
            if name in names or key_of.get(name) != (entry[0], entry[1]):
                continue  # superseded or duplicate: dropped for good
            kept.append(entry)
            names.add(name)
            if name not in picked:
                view = self._lookup(replicas, positions, name)
                if view is not None:
                    out.append(view)
            budget -= 1
            if budget == 0:
                break
        # What was read is less than all the front left unread (each was the least when read), so the
        # new front stays sorted; a replica `_lookup` keyed meanwhile may have come in out of order.
        kept.sort()
        kept += front[used:]
        if len(kept) > FRONT_MAX:  # its tail goes back to the heap, where superseded entries get dropped
            for entry in kept[FRONT_MAX:]:
                heapq.heappush(heap, entry)
            del kept[FRONT_MAX:]
        self._front = kept
        if len(out) < k and len(out) + len(picked) < len(replicas):
            return None
        return out

    def _position_map(self, replicas: Sequence[ReplicaView]) -> dict[str, int]:
        """name -> index in ``replicas``, cached per fleet shape and checked on every use."""
        shape = (len(replicas), replicas[0].name, replicas[-1].name)
        positions = self._positions.get(shape)
        if positions is None:
            positions = self._rebuild(replicas, shape)
        return positions

    def _rebuild(self, replicas: Sequence[ReplicaView], shape: tuple[int, str, str]) -> dict[str, int]:
        if len(self._positions) > 8:
            self._positions.clear()
        positions = self._positions[shape] = {v.name: i for i, v in enumerate(replicas)}
        for view in replicas:  # replicas new to the order join it (least loaded: priced soon)
            if view.name not in self._key:
                self._store(view, -1)
                self._push(view.name)
        return positions

    def _lookup(self, replicas: Sequence[ReplicaView], positions: dict[str, int], name: str) -> ReplicaView | None:
        i = positions.get(name)
        if i is not None and i < len(replicas) and replicas[i].name == name:
            return replicas[i]
        if i is None and len(positions) == len(replicas):
            return None  # not eligible for this request
        shape = (len(replicas), replicas[0].name, replicas[-1].name)  # the fleet moved under this shape
        fresh = self._rebuild(replicas, shape)
        positions.clear()
        positions.update(fresh)
        i = positions.get(name)
        return None if i is None else replicas[i]
