"""Exact prefix-cache state from engines' KV cache events (vLLM's ZMQ protocol), phase 1 of issue 14.

- `wire`: the message structs (vLLM's, field for field) and decoding;
- `index`: `EngineBlockIndex`, one engine's blocks re-keyed with the router's own chained hash (pure);
- `sync`: `EventSync`, sequence tracking, gap/restart detection and replay decisions (pure);
- `precise`: `PreciseIndex`, all replicas, ``match(keys) -> {replica: Match(blocks, status)}`` (pure);
- `subscriber`: `KVEventHub`/`ReplicaSubscriber`, the asyncio + zmq.asyncio sockets feeding them.

See docs/kv_events.md.
"""

from router.kv_events.index import EngineBlockIndex, chain_key
from router.kv_events.precise import Match, PreciseIndex
from router.kv_events.sync import EventSync, Status

__all__ = ["EngineBlockIndex", "EventSync", "Match", "PreciseIndex", "Status", "chain_key"]
