"""`CandidateFilter`: the few replicas of a large fleet worth pricing for one request.

Pricing every replica costs ``cost`` a few microseconds each (~4.5 ms a decision at 1,000 replicas).
The replica the full scan picks is, in practice, one holding the prompt as deep as it is held anywhere
(least prefill) or one of the least loaded (least queue and crowding). So only those are priced:

- holders: for each match depth the prefix index reports, the ``k`` least loaded replicas holding the
  prompt that deep (all of them when fewer);
- least loaded: the ``k`` least loaded replicas of the fleet.

"Load" is the order of cost's own tie-break: ``request_load / weight`` (the router's in-flight count,
raised to the engine's fresh running + waiting, which is what every load term of the cost grows with:
queue, crowding, and the slot wait once in-flight reaches the engine's limit), then the replica sent to
least recently. The second key matters on an idle fleet: every replica then costs the same, the full
scan goes round them all by "least recently sent", and so does this order.

The order is kept incrementally in a lazy min-heap: a replica's key is re-read from its view whenever it
is priced, moved by +1/-1 on dispatch and completion (the router's in-flight count moves the same way),
and every key is re-read from the views once per ``len(fleet)`` decisions (one full pass amortised to
O(1) a decision), so load that only the engine sees (other routers' traffic) is picked up within that
many decisions. Small fleets (``<= full_scan_below``) are always priced in full, the same result.
Whenever the order cannot give ``k`` eligible replicas cheaply (a fleet serving several models shares
one order; many replicas ejected at once), the whole fleet is priced: slower, never wrong.

On the benchmark workloads (`python -m benchmarks.candidates_check`, 64 and 256 replicas) ``k = 8``
never picked a replica costing more than the full scan's choice (6-8 % of picks differ, all between
equal costs) and TTFT and hit rate were unchanged; ``k = 4`` did (agentic: 18 of 384, TTFT +6 %).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from router.replica_view import ReplicaView

DEFAULT_K = 8
Key = tuple[float, int]  # (request load / weight, number of the dispatch that last went there; -1 never)
_NEVER: Key = (0.0, -1)  # a replica not in the order yet sorts first: it gets priced


class CandidateFilter:
    """Incremental "least loaded" order plus the holders of a prompt, as views to price.

    k: replicas taken per match depth and from the least-loaded order (0 disables the filter).
    Engine reports are read as the views carry them: a stale one was dropped when the view was built.
    """

    def __init__(self, k: int = DEFAULT_K) -> None:
        if k < 0:
            raise ValueError("candidate k must be >= 0")
        self.k = k
        self.full_scan_below = 4 * k  # at or below this many replicas, price them all
        self._key: dict[str, Key] = {}
        self._load: dict[str, tuple[int, int, float]] = {}  # name -> (in flight, engine load, weight)
        self._heap: list[tuple[float, int, str]] = []
        self._positions: dict[tuple[int, str, str], dict[str, int]] = {}
        self._until_refresh = 0

    def active(self, n: int) -> bool:
        return self.k > 0 and n > self.full_scan_below

    # -- choosing ----------------------------------------------------------------------------------

    def select(self, replicas: Sequence[ReplicaView], matched: Mapping[str, int],
               last_sent: Mapping[str, int]) -> list[ReplicaView] | None:
        """The views to price, or None when the whole fleet should be priced: once per ``len(fleet)``
        decisions (the keys are then re-read from all views), or when the order is out of step."""
        self._until_refresh -= 1
        if self._until_refresh < 0:
            self.refresh(replicas, last_sent)
            return None
        positions = self._position_map(replicas)
        k, key_of = self.k, self._key
        picked: dict[str, ReplicaView] = {}
        if matched:
            holders: list[str] = list(matched)
            if len(holders) > k:  # per match depth, the k least loaded holders
                if len(set(matched.values())) == 1:  # the common case: one depth
                    ranked = [(key_of.get(name, _NEVER), name) for name in holders]
                    holders = [name for _, name in heapq.nsmallest(k, ranked)]
                else:
                    groups: dict[int, list[tuple[Key, str]]] = {}
                    for name, depth in matched.items():
                        groups.setdefault(depth, []).append((key_of.get(name, _NEVER), name))
                    holders = [name for group in groups.values()
                               for _, name in (heapq.nsmallest(k, group) if len(group) > k else group)]
            for name in holders:
                view = self._lookup(replicas, positions, name)
                if view is not None:
                    picked[name] = view
        least = self._least(k, replicas, positions, picked)
        if least is None:
            return None
        return [*picked.values(), *least]

    def refresh(self, replicas: Sequence[ReplicaView], last_sent: Mapping[str, int]) -> None:
        """Re-read every key from ``replicas`` (forgetting replicas not among them) and rebuild the heap."""
        self._key.clear()
        self._load.clear()
        positions: dict[str, int] = {}
        for i, view in enumerate(replicas):
            self._store(view, last_sent.get(view.name, -1))
            positions[view.name] = i
        self._heap = [(load, last, name) for name, (load, last) in self._key.items()]
        heapq.heapify(self._heap)
        self._positions = {(len(replicas), replicas[0].name, replicas[-1].name): positions}
        self._until_refresh = len(replicas)

    # -- bookkeeping -------------------------------------------------------------------------------

    def seen(self, view: ReplicaView, last_sent: int) -> None:
        """``view`` was priced: its key is what the view says now."""
        old = self._key.get(view.name)
        self._store(view, last_sent)
        if self._key[view.name] != old:
            self._push(view.name)

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
        self._key.pop(name, None)
        self._load.pop(name, None)
        self._positions.clear()

    # -- internals ---------------------------------------------------------------------------------

    def _store(self, view: ReplicaView, last_sent: int) -> None:
        engine = view.running + view.waiting if view.engine_fresh() else 0
        weight = view.weight if view.weight > 0 else 1.0
        self._load[view.name] = (view.in_flight_requests, engine, weight)
        self._key[view.name] = (max(view.in_flight_requests, engine) / weight, last_sent)

    def _set(self, name: str, last_sent: int) -> None:
        flight, engine, weight = self._load[name]
        self._key[name] = (max(flight, engine) / weight, last_sent)
        self._push(name)

    def _push(self, name: str) -> None:
        load, last = self._key[name]
        heap = self._heap
        heapq.heappush(heap, (load, last, name))
        if len(heap) > 4 * len(self._key) + 64:  # drop entries superseded since
            self._heap = [(lo, la, n) for n, (lo, la) in self._key.items()]
            heapq.heapify(self._heap)

    def _least(self, k: int, replicas: Sequence[ReplicaView], positions: dict[str, int],
               picked: dict[str, ReplicaView]) -> list[ReplicaView] | None:
        """The k least loaded eligible views not already picked; None if too many heap entries are of
        replicas not among ``replicas`` (another model's, or ejected): then price the whole fleet."""
        heap, key_of = self._heap, self._key
        out: list[ReplicaView] = []
        kept: list[tuple[float, int, str]] = []
        names: set[str] = set()
        budget = 4 * k + 16
        while heap and len(out) < k:
            entry = heapq.heappop(heap)
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
        for entry in kept:
            heapq.heappush(heap, entry)
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
