"""`PreciseIndex`: every replica's event-fed block index, and the query a policy asks. Pure (no I/O).

One `EventSync` (sequence tracking + `EngineBlockIndex`) per replica. `match` answers, for a request's
chained block keys (`router.features.hashing.token_block_hashes(token_ids, block_size, model)`), how many
leading blocks each replica holds, with the replica's sync status next to it so a policy can decide what
to trust (phase 2: ``index: precise | approximate | auto`` in the cost policy):

- ``synced``: exact;
- ``partial``: a lower bound (the index is a subset of the engine's cache);
- ``stale`` / ``unsynced``: unknown; fall back to the approximate index.

    >>> from kv_wire import BlockStored, KVEventBatch
    >>> from router.features.hashing import token_block_hashes
    >>> idx = PreciseIndex()
    >>> a = idx.add_replica("a", block_size=2, model="m")
    >>> a.full_resync(); a.on_replay_end(ok=True)   # the engine had published nothing yet
    0
    >>> ev = BlockStored(block_hashes=[7], parent_block_hash=None, token_ids=[1, 2], block_size=2,
    ...                  lora_id=None, medium="GPU", lora_name=None)
    >>> a.on_live(0, KVEventBatch(ts=1.0, events=[ev]))
    >>> idx.match(token_block_hashes([1, 2, 3, 4], 2, "m"))
    {'a': Match(blocks=1, status='synced')}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

from router.kv_events.holders import Holders
from router.kv_events.index import DEFAULT_MEMORY, EngineBlockIndex
from router.kv_events.sync import EventSync, Status


class Match(NamedTuple):
    blocks: int  # leading blocks of the request the replica holds (per its index)
    status: Status  # how far to trust `blocks`


class PreciseIndex:
    """Replica name -> `EventSync`; `match` over all of them in one walk (`Holders`)."""

    def __init__(self) -> None:
        self._replicas: dict[str, EventSync] = {}
        self._holders = Holders()
        self._bits: dict[str, int] = {}

    def add_replica(self, name: str, block_size: int, model: str, memory: int = DEFAULT_MEMORY) -> EventSync:
        """Track a replica (replacing any previous state under that name)."""
        self.remove_replica(name)
        sync = EventSync(EngineBlockIndex(block_size, model, memory))
        bit = self._bits[name] = self._holders.take_bit()
        sync.index.attach(self._holders, bit)
        self._replicas[name] = sync
        return sync

    def remove_replica(self, name: str) -> None:
        sync = self._replicas.pop(name, None)
        if sync is not None:
            sync.index.detach()  # a replaced replica's subscriber may still feed it: it no longer counts
            self._holders.release_bit(self._bits.pop(name))

    def replica(self, name: str) -> EventSync | None:
        return self._replicas.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._replicas

    def names(self) -> list[str]:
        return list(self._replicas)

    def status(self, name: str) -> Status | None:
        sync = self._replicas.get(name)
        return None if sync is None else sync.status

    def match(self, keys: Sequence[int], names: Sequence[str] | None = None) -> dict[str, Match]:
        """Leading blocks held per replica (all tracked replicas, or ``names``), with their status: what
        each replica's `EngineBlockIndex.match` says, found in one walk over ``keys``."""
        replicas, bits = self._replicas, self._bits
        chosen = [n for n in (replicas if names is None else names) if n in replicas]
        want = 0
        for name in chosen:
            want |= bits[name]
        depths = self._holders.depths(keys, want)
        return {name: Match(depths[bits[name]], replicas[name].status) for name in chosen}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per replica: status, next sequence, blocks held and every counter (for admin views and metrics)."""
        return {
            name: {"status": sync.status, "next_seq": sync.next_seq, "blocks": len(sync.index),
                   "block_size": sync.index.block_size, "sync": asdict(sync.stats),
                   "index": asdict(sync.index.stats)}
            for name, sync in self._replicas.items()
        }
