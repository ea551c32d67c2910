"""A paged KV cache with automatic prefix caching, following vLLM v1's block pool.

The parts that decide which requests hit the cache are modelled the way vLLM does them, because those are
what a prefix-aware router is measured against:

* Full blocks are identified by a hash chain, `hash_i = xxh64(hash_{i-1} || token ids of block i)`, so a
  block only matches when everything before it matches too.
* A block whose last user finishes keeps its hash and goes to the tail of an LRU free queue: it can still
  be hit until the allocator pops it from the head and reuses it (that is the eviction).
* A request's blocks are released tail first, so the end of a prompt is evicted before its shared start.
* A lookup never covers the whole prompt: at least one token is recomputed to produce logits.

Blocks are allocated lazily as tokens are scheduled (prefill chunks, then one slot per decode token).

KV events (optional, `enable_events`): as vLLM's block pool does, the cache queues a `BlockStored` for every
run of blocks it starts caching (with the parent's hash and the blocks' token ids), a `BlockRemoved` for
every cached block it evicts, and `AllBlocksCleared` when a reset empties it; `take_events` drains the
queue (the backend publishes it once per step, see `engine_server.kv_events`).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from engine_server.kv_events import block_removed, block_stored
from kv_wire import AllBlocksCleared

ROOT_HASH = 0  # parent "hash" of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int], seed: int = 0) -> int:
    """Hash of one full block, chained on its parent's hash."""
    data = parent_hash.to_bytes(8, "little") + array("I", token_ids).tobytes()
    return xxhash.xxh64_intdigest(data, seed)


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, seed: int = 0) -> None:
    """Append the hashes of blocks that became full since `hashes` was last extended (in place).

    Sequences only grow, so a request computes each block's hash once over its lifetime.
    """
    if len(token_ids) < (len(hashes) + 1) * block_size:
        return  # no new full block (the common decode case)
    parent = hashes[-1] if hashes else ROOT_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], seed)
        hashes.append(parent)


def block_hashes(token_ids: Sequence[int], block_size: int, seed: int = 0) -> list[int]:
    out: list[int] = []
    extend_block_hashes(out, token_ids, block_size, seed)
    return out


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set while the block is reusable as a prefix-cache hit


@dataclass(slots=True)
class CacheStats:
    queries: int = 0  # prompt tokens looked up, cumulative
    hits: int = 0  # of those, tokens found cached
    evictions: int = 0  # cached blocks whose hash was dropped for reuse


class KVCache:
    """Block pool + per-request block tables. Not thread-safe; the scheduler owns it."""

    def __init__(self, num_blocks: int, block_size: int = 16, hash_seed: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Unreferenced blocks, least recently freed first. OrderedDict gives O(1) pop-head, append and
        # removal from the middle (when a free block is hit again).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._req_hashed: dict[str, int] = {}  # how many of the request's blocks carry their hash
        self.stats = CacheStats()
        self._events: list[Any] | None = None  # None: KV events off
        self._tokens_of: Callable[[str], Sequence[int]] | None = None

    # ------------------------------------------------------------------------------------ events

    def enable_events(self, tokens_of: Callable[[str], Sequence[int]]) -> None:
        """Queue vLLM-format KV events from now on; ``tokens_of(request_id)`` gives a request's token ids."""
        self._events = []
        self._tokens_of = tokens_of

    def take_events(self) -> list[Any]:
        """The events queued since the last call, oldest first (empty when events are off)."""
        events = self._events
        if not events:
            return []
        self._events = []
        return events

    # ------------------------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (some still hold a reusable hash)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_queue(self) -> list[int]:
        """Block ids in eviction order (next victim first); for tests and debugging."""
        return list(self._free)

    def req_blocks(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._cached

    def lookup(self, hashes: Sequence[int], num_tokens: int) -> list[KVBlock]:
        """Longest chain of cached blocks from the start, leaving at least the last token to compute."""
        max_blocks = max(num_tokens - 1, 0) // self.block_size
        hit: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(self.blocks[block_id])
        return hit

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (the scheduler skips retries and recomputes)."""
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    # -------------------------------------------------------------------------------- allocation

    def allocate(self, request_id: str, num_tokens: int, hit_blocks: Sequence[KVBlock] = ()) -> bool:
        """Make the request hold enough blocks for `num_tokens` tokens in total, or change nothing.

        `hit_blocks` (from `lookup`) are only passed when the request holds no blocks yet; they are shared
        (ref count +1) instead of allocated. Returns False if the free queue cannot cover the rest.
        """
        table = self._req_blocks.get(request_id)
        have = len(table) if table else 0
        need = -(-num_tokens // self.block_size) - have - len(hit_blocks)
        if not hit_blocks and need <= 0:
            return True  # the request's last block still has room (most decode steps)
        if hit_blocks and table:
            raise ValueError("hit blocks can only be attached to a request without blocks")
        # Hit blocks sitting in the free queue leave it when touched, so they are not available for `need`.
        reclaimed = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if need > len(self._free) - reclaimed:
            return False
        if table is None:
            table = self._req_blocks[request_id] = []
            self._req_hashed[request_id] = 0
        for b in hit_blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1
            table.append(b)
        self._req_hashed[request_id] += len(hit_blocks)
        for _ in range(max(need, 0)):
            block_id, _ = self._free.popitem(last=False)
            b = self.blocks[block_id]
            self._evict(b)
            b.ref_cnt = 1
            table.append(b)
        return True

    def _evict(self, b: KVBlock) -> None:
        if b.block_hash is not None:
            if self._cached.get(b.block_hash) == b.block_id:
                del self._cached[b.block_hash]
                self.stats.evictions += 1
                if self._events is not None:
                    self._events.append(block_removed([b.block_hash]))
            b.block_hash = None

    def cache_full_blocks(self, request_id: str, hashes: Sequence[int], num_tokens: int) -> None:
        """Publish the request's blocks fully covered by its first `num_tokens` tokens as cache entries.

        Called when tokens are scheduled (as vLLM does), so a later request in the same step can hit them.
        If an identical block is already cached (two requests computed it concurrently) the first copy
        stays the cache entry and this one is released without a hash.
        """
        table = self._req_blocks.get(request_id)
        if table is None:
            return
        start = self._req_hashed[request_id]
        end = min(num_tokens // self.block_size, len(hashes), len(table))
        if end <= start:
            return
        run_start = -1  # first block of the current run of newly cached blocks (for events)
        for i in range(start, end):
            b, h = table[i], hashes[i]
            if b.block_hash is None and h not in self._cached:
                b.block_hash = h
                self._cached[h] = b.block_id
                if run_start < 0:
                    run_start = i
            elif run_start >= 0:
                self._store_event(request_id, hashes, run_start, i)
                run_start = -1
        if run_start >= 0:
            self._store_event(request_id, hashes, run_start, end)
        self._req_hashed[request_id] = end

    def _store_event(self, request_id: str, hashes: Sequence[int], start: int, end: int) -> None:
        """Queue a `BlockStored` for blocks ``start..end-1`` of the request, chained to block ``start-1``."""
        if self._events is None or self._tokens_of is None:
            return
        bs = self.block_size
        tokens = list(self._tokens_of(request_id)[start * bs : end * bs])
        parent = hashes[start - 1] if start > 0 else None
        self._events.append(block_stored(list(hashes[start:end]), parent, tokens, bs))

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first, so its last blocks are the first to be evicted."""
        table = self._req_blocks.pop(request_id, None)
        self._req_hashed.pop(request_id, None)
        if not table:
            return
        for b in reversed(table):
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every reusable hash of unreferenced blocks (like vLLM's /reset_prefix_cache).

        With events on: `AllBlocksCleared` when nothing stays cached (vLLM only resets when no block is in
        use), otherwise one `BlockRemoved` per forgotten block.
        """
        mark = len(self._events) if self._events is not None else 0
        for block_id in self._free:
            self._evict(self.blocks[block_id])
        if self._events is not None and not self._cached and len(self._events) > mark:
            del self._events[mark:]
            self._events.append(AllBlocksCleared())
