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

from collections.abc import Mapping
from typing import Any

from router.features.hashing import token_block_hashes
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


class PrefixSource:
    """`PreciseIndex` + the engines' tokenizer: per-request exact matches (see the module docstring)."""

    def __init__(self, index: PreciseIndex, tokenizer: RequestTokenizer) -> None:
        self.index = index
        self.tokenizer = tokenizer

    def for_request(self, body: Mapping[str, Any], kind: Kind) -> RequestMatch:
        return RequestMatch(self, body, kind)

    def block_size(self, replica: str) -> int:
        sync = self.index.replica(replica)
        return sync.index.block_size if sync is not None else 1

    def match_ids(self, ids: list[int]) -> dict[str, Match]:
        """Every followed replica's match for these ids; keys computed once per (block size, model)."""
        groups: dict[tuple[int, str], list[str]] = {}
        for name in self.index.names():
            sync = self.index.replica(name)
            assert sync is not None
            groups.setdefault((sync.index.block_size, sync.index.model), []).append(name)
        out: dict[str, Match] = {}
        for (block_size, model), names in groups.items():
            out.update(self.index.match(token_block_hashes(ids, block_size, model), names))
        return out
