"""What the engines' KV events say about one request: the "prefix source" a policy consumes. Pure (no I/O).

`PrefixSource.for_request(body, kind)` returns a `RequestMatch` that does nothing until asked: a policy
that never looks costs nothing, and the first ``match()`` tokenizes the body (`router.features.tokenize`),
keys its blocks with the router's own chained hash once per (block size, model) among the replicas, and
asks the `PreciseIndex` how many leading blocks each replica holds, with that replica's sync status
(``synced`` exact, ``partial`` a lower bound, ``stale``/``unsynced`` unknown; see `precise`). The answer
is kept, so every policy and retry of the request sees the same numbers.

The cost policy's ``index: precise | approximate | auto`` option reads ``RequestFeatures.kv_match`` (one of
these, or None when KV events are off or the body cannot be tokenized exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from router.features.hashing import token_block_hashes
from router.features.lru import LRU
from router.features.tokenize import Kind, RequestTokenizer
from router.kv_events.precise import Match, PreciseIndex


class RequestMatch:
    """One request's exact prefix matches, computed on first use."""

    __slots__ = ("_source", "_body", "_kind", "_ids", "_done", "_matches")

    def __init__(self, source: PrefixSource, body: Mapping[str, Any], kind: Kind) -> None:
        self._source, self._body, self._kind = source, body, kind
        self._ids: list[int] | None = None
        self._done = False
        self._matches: dict[str, Match] = {}

    @property
    def token_ids(self) -> list[int] | None:
        """The prompt as the engine will see it (None: the router cannot reproduce it)."""
        self._compute()
        return self._ids

    def match(self) -> dict[str, Match]:
        """Replica -> `Match(blocks, status)` for every replica whose events are followed."""
        self._compute()
        return self._matches

    def cached_tokens(self, replica: str) -> int | None:
        """Prompt tokens ``replica`` holds per its index, None if it is not followed or not trusted
        (``stale``/``unsynced``); for ``partial`` a lower bound. Capped at ``len - 1`` as engines always
        compute the last token."""
        m = self.match().get(replica)
        if m is None or m.status not in ("synced", "partial") or self._ids is None:
            return None
        block = self._source.block_size(replica)
        return min(m.blocks * block, max(len(self._ids) - 1, 0) // block * block)

    def _compute(self) -> None:
        if self._done:
            return
        self._done = True
        self._ids = self._source.tokenizer.prompt_ids(self._body, self._kind)
        if self._ids is not None:
            self._matches = self._source.match_ids(self._ids)

    def compute_timed(self, clock: Callable[[], float]) -> tuple[float, float, float, float]:
        """`_compute`'s steps with ``clock`` read between them (`router.kv_events.measure`): seconds of
        (template, encode, keys, match). Needs a tokenizer with `render`/`encode_rendered` (ours)."""
        tok: Any = self._source.tokenizer
        t0 = clock()
        rendered = tok.render(self._body, self._kind)
        t1 = clock()
        self._ids = tok.encode_rendered(rendered)
        t2 = clock()
        self._done = True
        keys_s = match_s = 0.0
        if self._ids is not None:
            for (block_size, model), names in self._source.groups().items():
                t3 = clock()
                keys = self._source.keys(self._ids, block_size, model)
                t4 = clock()
                self._matches.update(self._source.index.match(keys, names))
                keys_s, match_s = keys_s + t4 - t3, match_s + clock() - t4
        return t1 - t0, t2 - t1, keys_s, match_s


class PrefixSource:
    """`PreciseIndex` + the engines' tokenizer: per-request exact matches (see the module docstring)."""

    def __init__(self, index: PreciseIndex, tokenizer: RequestTokenizer, *, cache_prompts: int = 4096,
                 per_probe: int = 32) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.per_probe = per_probe
        self._keys: dict[tuple[int, str], LRU] = {}  # (block size, model) -> probe -> [(ids, keys)]
        self._cache_prompts = cache_prompts

    def for_request(self, body: Mapping[str, Any], kind: Kind) -> RequestMatch:
        return RequestMatch(self, body, kind)

    def block_size(self, replica: str) -> int:
        sync = self.index.replica(replica)
        return sync.index.block_size if sync is not None else 1

    def groups(self) -> dict[tuple[int, str], list[str]]:
        """The followed replicas by (block size, model): one chain of keys each."""
        groups: dict[tuple[int, str], list[str]] = {}
        for name in self.index.names():
            sync = self.index.replica(name)
            assert sync is not None
            groups.setdefault((sync.index.block_size, sync.index.model), []).append(name)
        return groups

    def match_ids(self, ids: list[int]) -> dict[str, Match]:
        """Every followed replica's match for these ids; keys computed once per (block size, model)."""
        out: dict[str, Match] = {}
        for (block_size, model), names in self.groups().items():
            out.update(self.index.match(self.keys(ids, block_size, model), names))
        return out

    def keys(self, ids: list[int], block_size: int, model: str) -> tuple[int, ...]:
        """`token_block_hashes(ids, block_size, model)`, hashing only the blocks past those shared with a
        recent prompt (a chat's previous turn): the chain makes their keys valid. Shared blocks are found
        by comparing ids, which costs far less than hashing them.

        Recent prompts are found by probes: a block of ids at depth 0, 1, 2, 4, 8... (deepest first).
        The first block alone cannot tell sessions sharing a system prompt apart (with more of them than
        a probe keeps, a turn missed its own history); a deep block can. Each probe keeps its last
        ``per_probe`` prompts (the first block's) or 2 (deeper ones, which one session's turns share)."""
        cache = self._keys.get((block_size, model))
        if cache is None:
            cache = self._keys[(block_size, model)] = LRU(self._cache_prompts)
        n_blocks = len(ids) // block_size
        depths, d = [0], 1
        while d < n_blocks:
            depths.append(d)
            d *= 2
        probes = [(d, tuple(ids[d * block_size : (d + 1) * block_size])) for d in depths] if n_blocks else []
        shared, best = 0, ()
        for depth, probe in reversed(probes):
            if shared > depth:  # a deeper probe found more than a shallower one could add
                break
            entries: list[tuple[list[int], tuple[int, ...]]] | None = cache.get_fresh(probe)
            for old_ids, old_keys in reversed(entries or ()):
                if len(old_keys) <= shared:
                    continue
                if shared:  # it can beat ``best`` only if its block ``shared`` is ours too: one short look
                    lo = shared * block_size
                    if ids[lo : lo + block_size] != old_ids[lo : lo + block_size]:
                        continue
                n = _shared_blocks(ids, old_ids, block_size, len(old_keys))
                if n > shared:
                    shared, best = n, old_keys
        keys = best[:shared] + token_block_hashes(ids[shared * block_size:], block_size, model,
                                                  parent=best[shared - 1] if shared else None)
        entry = (ids, keys)
        for depth, probe in probes:
            entries = cache.get(probe)
            if entries is None:
                cache.put(probe, [entry])
            else:
                entries.append(entry)
                del entries[: -(self.per_probe if depth == 0 else 2)]
        return keys


def _shared_blocks(a: list[int], b: list[int], block_size: int, limit: int) -> int:
    """Leading whole blocks ``a`` and ``b`` have in common (at most ``limit``).

    Compared a span of blocks at a time (list slices compare in C), the span doubling while equal and
    halving where it differs: O(shared) ids touched and a dozen comparisons, where block by block a
    4k-token next turn took ~250 slices (~0.15 ms), and a prompt sharing only a system prompt stops early.
    When the last of the ``n`` blocks is shared, all are compared first: a chat's next turn shares them
    all, and one comparison copies half the ids the galloping does."""
    n = min(len(a) // block_size, len(b) // block_size, limit)
    whole = n * block_size
    last = whole - block_size
    if n and a[last:whole] == b[last:whole] and a[:last] == b[:last]:  # a chat's next turn: all n shared
        return n
    i, span, grow = 0, 1, True
    while i < n:
        span = min(span, n - i)
        lo, hi = i * block_size, (i + span) * block_size
        if a[lo:hi] == b[lo:hi]:
            i += span
            if grow:
                span *= 2
        elif span == 1:
            break
        else:
            span, grow = span // 2, False
    return i
