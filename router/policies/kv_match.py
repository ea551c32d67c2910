"""Which prefix matches the cost policy prices: the engines' KV events, its own guess, or both.

The cost policy's approximate index is a guess (what the router sent where, aged by an LRU sized like the
engine's cache). With KV events on, `RequestFeatures.kv_match` carries each followed replica's exact match
and how far to trust it (`router.kv_events.prefix_source`). ``index`` picks what a decision uses, per
replica (docs/kv_events.md, "What phase 2 must do", item 1):

============  =========================  ==================================  ========================
status        ``precise``                ``auto`` (default)                  ``approximate``
============  =========================  ==================================  ========================
synced        events (+ in flight)       events (+ in flight)                guess
partial       events (+ in flight)       max(events, guess)                  guess
stale/...     guess                      guess                               guess
============  =========================  ==================================  ========================

"+ in flight": the blocks of this policy's requests in flight on the replica (and ``hold_s`` after they
complete, 0 by default), which the engine may not have announced yet (the speculative insert: without it
a burst sharing a new prefix scatters before the first request's ``BlockStored`` arrives). A hold after
completion (a TTL, as vllm-router's) would also cover the router reading the events late: a sequential
chat's next turn, sent the moment the answer ends, missed its own history once in a 48-request run
without it; but with a 0.25 s or 2 s hold, multiturn at 0.7x the footprint lost hit rate (0.51 vs 0.62,
three runs), so it is off until that is understood. The approximate index keeps its own copy as before.
With no ``kv_match`` (events off, or a body the router cannot tokenize exactly) every mode is today's
approximate index, decision for decision.

Admission (issue 14): an announced match is what the engine holds *now*; the request is served from what
it holds when it is admitted. Blocks no running request references sit in the engine's LRU free queue,
and every block allocated before the request's admission (the prompts the engine reports waiting) evicts
the oldest of them. So behind a queue (``room(name)`` not None: the cost policy passes the free blocks of
a fresh report minus the waiting prompts' uncached tokens, in the policy's estimated tokens) an announced
match counts the part its in-flight requests pin, plus at most ``room`` more, and no more than the guess
holds: the guess is an LRU of the engine's size over what was sent, so an announced block it has aged out
is among the oldest in the engine's queue and goes first (with one router process only: with K each
guess sees 1/K of the traffic and misses the blocks the others sent, which cost multiturn at K=4 up to
0.05 of hit rate). Nothing waiting, or no fresh report: no bound.
Why: at 0.3x the footprint, multiturn turns went to the replica that had announced their whole history,
waited behind prompts that evicted it, and recomputed it (46 of 768 requests found ~13 of ~110 blocks),
where the guess had aged it (docs/kv_events.md, "Admission").

Units: the policy counts blocks of its own chain (``features.block_hashes``, ``block_tokens`` estimated
tokens each); an exact match is the engine's cached tokens, converted by this request's tokens-per-
estimated-token, as the cost policy's cached_tokens correction does.

The policy reads the match through `KVMatch`, a two-method protocol: it imports nothing of the event
machinery (no ZMQ), and the candidate pre-filter is handed the blended matches, so both see the same.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, Protocol

from router.features.parse import RequestFeatures

IndexMode = Literal["precise", "approximate", "auto"]
INDEX_MODES: tuple[str, ...] = ("precise", "approximate", "auto")


class KVMatch(Protocol):
    """What a policy needs of one request's event-fed matches (`router.kv_events.prefix_source.RequestMatch`)."""

    @property
    def token_ids(self) -> list[int] | None: ...

    def match(self) -> Mapping[str, tuple[int, str]]: ...  # replica -> (blocks, status)

    def cached_tokens(self, replica: str) -> int | None: ...


class GuessIndex(Protocol):
    """What `Guess` needs of the approximate index (`router.prefix_index.PrefixIndex`)."""

    def match(self, hashes: Sequence[int]) -> dict[str, int]: ...

    def replicas(self) -> list[str]: ...


class Guess(Mapping[str, int]):
    """The approximate index's match for one request, walked on first read.

    Why: with every replica the guess knows followed by synced events and nothing waiting, `blend` reads
    no guess at all, and the walk over the request's ~300 character blocks was a fifth of a decision.
    Reads as the dict ``index.match(hashes)`` would be; ``replicas()`` names who it could hold, unwalked.
    """

    __slots__ = ("_index", "_hashes", "_value")

    def __init__(self, index: GuessIndex, hashes: Sequence[int]) -> None:
        self._index, self._hashes = index, hashes
        self._value: dict[str, int] | None = None

    def replicas(self) -> list[str]:
        return self._index.replicas()

    def _walked(self) -> dict[str, int]:
        if self._value is None:
            self._value = self._index.match(self._hashes)
        return self._value

    def __getitem__(self, name: str) -> int:
        return self._walked()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._walked())

    def __len__(self) -> int:
        return len(self._walked())


class InFlightBlocks:
    """Per replica, the block chains of requests sent there: held while in flight and ``hold_s`` after.

    The hold after completion would cover the events' lag (see the module docstring for why it is 0 by
    default). ``clock`` is injectable for tests. Counts are a `Counter` per replica because ``add`` runs
    on every dispatch over the whole chain: ``Counter.update`` counts in C (~5x the Python loop).
    """

    def __init__(self, hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self._counts: dict[str, Counter[int]] = {}  # replica -> hash -> requests in flight (0: held only)
        self._until: dict[str, dict[int, float]] = {}  # replica -> hash -> held until (absent: 0.0)
        self._expiring: deque[tuple[float, str, Sequence[int]]] = deque()

    def add(self, replica: str, hashes: Sequence[int]) -> None:
        counts = self._counts.get(replica)
        if counts is None:
            counts = self._counts[replica] = Counter()
            self._until[replica] = {}
        counts.update(hashes)

    def remove(self, replica: str, hashes: Sequence[int]) -> None:
        """The request completed (or failed): its blocks are held ``hold_s`` longer, then dropped."""
        now = self.clock()
        self._expire(now)
        counts = self._counts.get(replica)
        if counts is None:
            return
        held_until = self._until[replica]
        if self.hold_s <= 0:  # nothing is held after completion: a block no request holds is gone now
            for h in hashes:
                c = counts.get(h)
                if c is not None:
                    if c > 1:
                        counts[h] = c - 1
                    elif held_until.get(h, 0.0) > now:  # held by an earlier hold_s (it was reloaded)
                        counts[h] = 0
                    else:
                        del counts[h]
                        held_until.pop(h, None)
            if not counts:
                self.forget(replica)
            return
        until = now + self.hold_s
        for h in hashes:
            c = counts.get(h)
            if c is not None:
                counts[h] = c - 1 if c > 0 else 0
                if held_until.get(h, 0.0) < until:
                    held_until[h] = until
        self._expiring.append((until, replica, hashes))

    def forget(self, replica: str) -> None:
        self._counts.pop(replica, None)
        self._until.pop(replica, None)

    def match(self, replica: str, hashes: Sequence[int]) -> int:
        counts = self._counts.get(replica)
        if not counts:
            return 0
        held_until = self._until[replica]
        now = self.clock()
        n = 0
        for h in hashes:
            c = counts.get(h)
            if c is None or (c == 0 and held_until.get(h, 0.0) <= now):
                break
            n += 1
        return n

    def _expire(self, now: float) -> None:
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            _, replica, hashes = expiring.popleft()
            counts = self._counts.get(replica)
            if counts is None:
                continue
            held_until = self._until[replica]
            for h in hashes:
                if counts.get(h) == 0 and held_until.get(h, 0.0) <= now:
                    del counts[h]
                    held_until.pop(h, None)
            if not counts:
                self.forget(replica)


def blend(mode: str, approx: Mapping[str, int], features: RequestFeatures, in_flight: InFlightBlocks,
          room: Callable[[str], float | None] | None = None, guess_is_lru: bool = True) -> dict[str, int]:
    """Matched blocks per replica (replicas matching nothing left out), per the module's table.

    ``approx``: the approximate index's match, or a `Guess` of it (walked only if read: the same answer).

    ``room(name)``: estimated tokens the engine allocates from its free blocks before this request's
    admission without evicting its announced match (None: nothing waits there, no bound); see the module
    docstring, "Admission"). ``guess_is_lru``: the guess saw every request sent to the engines (one router
    process), so it orders their blocks by age; with several it misses the others' and bounds nothing."""
    kv = features.kv_match
    if mode == "approximate" or kv is None:
        return dict(approx)
    exact = kv.match()
    if not exact:
        return dict(approx)
    ids = kv.token_ids
    if isinstance(approx, Guess) and all(name in exact for name in approx.replicas()):
        out: dict[str, int] = {}  # every replica the guess knows is followed: the guess names no other
    else:
        out = {name: blocks for name, blocks in approx.items() if name not in exact}
    hashes = features.block_hashes
    for name, (_, status) in exact.items():  # the guess is read only where the table says so
        if status not in ("synced", "partial"):
            blocks = approx.get(name, 0)
        else:
            blocks = _in_our_blocks(kv.cached_tokens(name), ids, features)
            pinned = in_flight.match(name, hashes)
            if blocks > pinned and room is not None:
                free = room(name)
                if free is not None:
                    blocks = min(blocks, pinned + math.floor(max(0.0, free) / features.block_tokens + 1e-9))
                    if guess_is_lru:
                        blocks = min(blocks, max(approx.get(name, 0), pinned))
            blocks = max(blocks, pinned)
            if status == "partial" and mode == "auto":
                blocks = max(blocks, approx.get(name, 0))
        if blocks > 0:
            out[name] = blocks
    return out


def _in_our_blocks(cached: int | None, ids: list[int] | None, features: RequestFeatures) -> int:
    """Engine-cached tokens as blocks of the policy's own chain (capped at the chain's length)."""
    if not cached or not ids:
        return 0
    blocks = cached / len(ids) * features.token_estimate / features.block_tokens
    return min(math.floor(blocks + 1e-9), len(features.block_hashes))
