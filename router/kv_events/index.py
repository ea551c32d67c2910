"""`EngineBlockIndex`: one engine's prefix cache, exactly, rebuilt from its KV events. Pure (no I/O).

Engines name blocks by their own hashes, which depend on the engine's hash function and seed (vLLM's
``PYTHONHASHSEED``/``--prefix-caching-hash-algo``, our sim's xxh64). The router cannot compute those for a
new request, so it re-derives its **own key** for every stored block from the event's token ids, chained
on the parent block's key exactly as `router.features.hashing.token_block_hashes` chains a request:

    key_0 = XXH3-64(tokens of block 0, seed = model_seed(model, tokens=True))
    key_i = XXH3-64(tokens of block i, seed = key_{i-1})

so ``token_block_hashes(request_token_ids, block_size, model)`` gives a request's keys and `match` counts
how many leading ones the engine holds. Exact hits and exact evictions, independent of the engine's seed.

Rules, each following what the engine does:

- ``BlockStored`` resolves its parent's key from the parent's engine hash. The engine→key map remembers
  removed blocks too (bounded, ``memory``), because a block may be stored after its parent was evicted
  (the child is then present but unreachable, as in the engine). A store whose parent is unknown (events
  lost before we subscribed) is kept as *unresolved*: present, never matched, counted.
- Stores are counted per engine hash and removes decrement: vLLM may cache two physical blocks with one
  hash and then sends two stores and two removes. (vLLM's per-request ``kv_cache_report_mode="full"``
  re-announces reused blocks without a matching remove; that mode is not supported.)
- Only events for the attention group the index follows (``group_idx`` None or 0), the GPU tier
  (``medium`` None or "GPU") and this index's block size count; others are ignored and counted (hybrid
  models, CPU offloading and vLLM's partial-block entries are phase 2).
- A LoRA request's chain is rooted at its adapter name (``lora_name``), which is the model name a client
  sends for it. Per-block ``extra_keys`` other than the LoRA name (multimodal inputs, cache salt) are
  folded into the key, so such blocks never match a plain-token request.
- ``AllBlocksCleared`` empties the index (the engine still hashes the same way, so the map stays).

Worked example (mirrored by ``tests/router/test_kv_event_index.py``)::

    >>> from kv_wire import BlockStored, BlockRemoved
    >>> from router.features.hashing import token_block_hashes
    >>> idx = EngineBlockIndex(block_size=2, model="m")
    >>> def stored(hashes, parent, tokens):
    ...     return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
    ...                        block_size=2, lora_id=None, medium="GPU", lora_name=None)
    >>> idx.apply(stored([101, 102], None, [1, 2, 3, 4]))      # engine hashes are opaque to us
    >>> idx.apply(stored([203], 102, [5, 6]))                  # extends the chain
    >>> idx.match(token_block_hashes([1, 2, 3, 4, 5, 6, 7], 2, "m"))
    3
    >>> idx.apply(BlockRemoved(block_hashes=[102], medium="GPU"))   # evicted in the middle
    >>> idx.match(token_block_hashes([1, 2, 3, 4, 5, 6], 2, "m"))    # a hit needs the whole chain
    1
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec
from xxhash import xxh3_64_intdigest

from kv_wire import AllBlocksCleared, BlockRemoved, BlockStored, ExternalBlockHash, KVEvent
from router.features.hashing import model_seed
from router.kv_events.holders import Holders

DEFAULT_MEMORY = 1 << 16  # removed blocks whose engine hash -> key mapping is remembered (~6 MB)
_UNRESOLVED = -1  # key of a present block whose chain we could not rebuild (never a valid match)


def _pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as 8-byte little-endian integers, as `token_block_hashes` packs them."""
    packed = array("q", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def chain_key(parent_key: int, token_ids: Sequence[int], extra: tuple | None = None) -> int:
    """The router's key of one block: `token_block_hashes`'s step, with extra keys folded in first."""
    seed = parent_key
    if extra is not None:
        seed = xxh3_64_intdigest(msgspec.msgpack.encode(extra), seed)
    return xxh3_64_intdigest(_pack(token_ids), seed)


@dataclass(slots=True)
class IndexStats:
    stored: int = 0  # blocks stored (events' block hashes)
    removed: int = 0  # blocks removed that the index held
    cleared: int = 0  # AllBlocksCleared events
    unresolved: int = 0  # blocks stored whose parent chain was unknown
    ignored: int = 0  # events for another group, medium or block size, or malformed
    unknown_removes: int = 0  # removes of blocks the index did not hold


class EngineBlockIndex:
    """The blocks one engine holds, keyed by the router's own chained hash."""

    def __init__(self, block_size: int, model: str, memory: int = DEFAULT_MEMORY) -> None:
        if block_size < 1 or memory < 0:
            raise ValueError("block_size must be >= 1 and memory >= 0")
        self.block_size = block_size
        self.model = model
        self.memory = memory
        # engine hash -> key, and copies beyond the first: plain ints, so the index's hundreds of thousands
        # of entries are no objects for the garbage collector to traverse (a list each used to be)
        self._present: dict[ExternalBlockHash, int] = {}
        self._copies: dict[ExternalBlockHash, int] = {}
        self._held: dict[int, int] = {}  # key -> present engine hashes with that key (normally 1)
        self._removed: OrderedDict[ExternalBlockHash, int] = OrderedDict()  # engine hash -> key, LRU
        self._roots: dict[str | None, int] = {}
        self.stats = IndexStats()
        self._holders: Holders | None = None  # shared with the other replicas' indexes (`attach`)
        self._bit = 0

    def attach(self, holders: Holders, bit: int) -> None:
        """Announce every held key (and every later change) to ``holders`` under ``bit``."""
        self.detach()
        self._holders, self._bit = holders, bit
        for key in self._held:
            holders.add(key, bit)

    def detach(self) -> None:
        """Withdraw this index's keys from its `Holders` and stop announcing (a replaced replica)."""
        holders, self._holders = self._holders, None
        if holders is not None:
            for key in self._held:
                holders.discard(key, self._bit)

    # -- queries -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Blocks the engine holds (resolved or not)."""
        return len(self._present)

    def match(self, keys: Sequence[int]) -> int:
        """How many of ``keys`` (a request's chained block keys) the engine holds, counted from the first."""
        held = self._held
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def engine_hashes(self) -> set[ExternalBlockHash]:
        """The engine's hashes of the blocks held (resolved or not; for tests and debugging)."""
        return set(self._present)

    def keys(self) -> set[int]:
        """Keys of the resolved blocks held (for tests and debugging)."""
        return set(self._held)

    # -- events --------------------------------------------------------------------------------------

    def apply_all(self, events: Iterable[KVEvent]) -> None:
        for ev in events:
            self.apply(ev)

    def apply(self, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self._stored(event)
        elif isinstance(event, BlockRemoved):
            if not self._ours(event.group_idx, event.medium):
                self.stats.ignored += 1
                return
            for h in event.block_hashes:
                self._remove(h)
        elif isinstance(event, AllBlocksCleared):
            self.clear(forget=False)
            self.stats.cleared += 1

    def clear(self, *, forget: bool) -> None:
        """Drop every block; ``forget`` also drops the engine-hash memory (a restarted engine may re-seed)."""
        if not forget:
            for h, key in self._present.items():
                self._remember(h, key)
        holders = self._holders
        if holders is not None:
            for key in self._held:
                holders.discard(key, self._bit)
        self._present.clear()
        self._copies.clear()
        self._held.clear()
        if forget:
            self._removed.clear()

    # -- internals -----------------------------------------------------------------------------------

    @staticmethod
    def _ours(group_idx: int | None, medium: str | None) -> bool:
        return group_idx in (None, 0) and medium in (None, "GPU")

    def _root(self, lora_name: str | None) -> int:
        root = self._roots.get(lora_name)
        if root is None:
            root = self._roots[lora_name] = model_seed(lora_name or self.model, tokens=True)
        return root

    def _key_of(self, h: ExternalBlockHash) -> int | None:
        key = self._present.get(h)
        if key is not None:
            return key
        return self._removed.get(h)

    def _stored(self, ev: BlockStored) -> None:
        bs, n = self.block_size, len(ev.block_hashes)
        if not self._ours(ev.group_idx, ev.medium) or ev.block_size != bs or len(ev.token_ids) != n * bs:
            self.stats.ignored += 1
            return
        if ev.parent_block_hash is None:
            parent: int | None = self._root(ev.lora_name)
        else:
            parent = self._key_of(ev.parent_block_hash)
            if parent == _UNRESOLVED:
                parent = None
        extras = ev.extra_keys
        packed = _pack(ev.token_ids)
        step = 8 * bs
        for i, h in enumerate(ev.block_hashes):
            if parent is not None:
                seed = parent
                extra = extras[i] if extras is not None and i < len(extras) else None
                if extra is not None and ev.lora_name is not None and extra[:1] == (ev.lora_name,):
                    extra = extra[1:] or None  # the LoRA name is already the chain's root
                if extra is not None:
                    seed = xxh3_64_intdigest(msgspec.msgpack.encode(extra), seed)
                parent = xxh3_64_intdigest(packed[i * step : (i + 1) * step], seed)
                key = parent
            else:
                key = _UNRESOLVED
                self.stats.unresolved += 1
            self._add(h, key)
        self.stats.stored += n

    def _add(self, h: ExternalBlockHash, key: int) -> None:
        if h in self._present:
            self._copies[h] = self._copies.get(h, 0) + 1  # another physical copy of the same block
            return
        self._removed.pop(h, None)
        self._present[h] = key
        if key != _UNRESOLVED:
            held = self._held.get(key, 0)
            self._held[key] = held + 1
            if not held and self._holders is not None:
                self._holders.add(key, self._bit)

    def _remove(self, h: ExternalBlockHash) -> None:
        key = self._present.get(h)
        if key is None:
            self.stats.unknown_removes += 1
            return
        self.stats.removed += 1
        extra = self._copies.get(h)
        if extra is not None:
            if extra > 1:
                self._copies[h] = extra - 1
            else:
                del self._copies[h]
            return
        del self._present[h]
        if key != _UNRESOLVED:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
                if self._holders is not None:
                    self._holders.discard(key, self._bit)
        self._remember(h, key)

    def _remember(self, h: ExternalBlockHash, key: int) -> None:
        if self.memory == 0:
            return
        removed = self._removed
        removed[h] = key
        removed.move_to_end(h)
        if len(removed) > self.memory:
            removed.popitem(last=False)
