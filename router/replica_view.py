"""`ReplicaView`: the read-only snapshot of one replica that policies decide on.

The dispatcher (or the simulator) builds one per eligible replica for each decision, with
`ReplicaState.view`, from two sources that policies must not confuse:

- the router's own counters (``in_flight_requests``, ``in_flight_tokens``), always current;
- the engine's polled load report (``running``, ``waiting``, ``kv_blocks_*``, ``block_size``), as old as
  ``load_age_s``. ``None`` means no report was received, or the last one was older than the router's
  ``load.stale_after_s`` when the view was built: freshness is decided there, once, so policies never
  filter again. Missing is not zero: policies then fall back to the router's counters, which is what
  `request_load` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, overload


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as seen at decision time.

    weight: relative capacity (2.0 = twice as fast); loads and costs are divided by it.
    in_flight_requests: requests this router has sent there and not yet seen finish.
    in_flight_tokens: prompt tokens of those requests that have not finished prefill yet.
    running, waiting, kv_blocks_used, kv_blocks_total, block_size: the engine's last load report
        (meaningful only while fresh, see `engine_fresh`).
    load_age_s: seconds since that report was received; None = never, or stale when the view was built.
    max_num_seqs: the engine's concurrency limit from its /load report (any age: it is static);
        0 = not reported (a stock vLLM's /metrics does not say).
    finished_since_report: requests of this router that were in flight when the (fresh) report was
        received and have finished since: the report may still count them in ``running``.
    """

    name: str
    url: str
    weight: float = 1.0
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    block_size: int = 0
    load_age_s: float | None = None
    healthy: bool = True
    max_num_seqs: int = 0
    finished_since_report: int = 0

    def engine_fresh(self) -> bool:
        """True when the view carries an engine load report (the view's builder dropped a stale one)."""
        return self.load_age_s is not None

    def request_load(self) -> int:
        """Requests at the replica: the router's count, raised to the engine's running + waiting when
        that report is fresh (other routers' traffic shows up only there). Never lower than our count."""
        load = self.in_flight_requests
        if self.load_age_s is not None and self.running + self.waiting > load:
            load = self.running + self.waiting
        return load

    def kv_capacity_tokens(self) -> int | None:
        """Tokens the engine's KV cache holds, if it reported its geometry (any age: it is static)."""
        if self.kv_blocks_total > 0 and self.block_size > 0:
            return self.kv_blocks_total * self.block_size
        return None


class HasView(Protocol):
    def view(self, now: float, stale_after_s: float) -> ReplicaView: ...


class LazyViews(Sequence[ReplicaView]):
    """The views of ``sources`` as of ``now``, each built on first access.

    For large fleets: `cost` reads only its candidates' views (plus one full pass every ``len`` decisions),
    so building all of them per request would cost more than the decision. Reads within one synchronous
    ``choose()`` see the same state an eager list would have captured."""

    __slots__ = ("_sources", "_now", "_stale", "_built", "_read")

    def __init__(self, sources: Sequence[HasView], now: float, stale_after_s: float) -> None:
        self._sources = sources
        self._now = now
        self._stale = stale_after_s
        self._built: list[ReplicaView | None] = [None] * len(sources)
        self._read: list[int] = []  # indices built so far, in order

    def __len__(self) -> int:
        return len(self._sources)

    @overload
    def __getitem__(self, i: int) -> ReplicaView: ...
    @overload
    def __getitem__(self, i: slice) -> list[ReplicaView]: ...
    def __getitem__(self, i: int | slice) -> ReplicaView | list[ReplicaView]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        view = self._built[i]
        if view is None:
            view = self._built[i] = self._sources[i].view(self._now, self._stale)
            self._read.append(i)
        return view

    def index_of(self, name: str) -> int | None:
        """Where the view named ``name`` is, among those built so far (a policy chooses among the views
        it read, so finding its choice costs what it read, not the fleet's size); None if not built."""
        built = self._built
        for i in self._read:
            view = built[i]
            if view is not None and view.name == name:
                return i
        return None

    def __iter__(self) -> Iterator[ReplicaView]:
        for i in range(len(self._sources)):
            yield self[i]
