"""vLLM's KV cache event wire format (``vllm/distributed/kv_events.py``), shared by the engine servers
that publish it and the router that decodes it.

A message on the PUB socket is ``[topic, seq, payload]``: ``seq`` an 8-byte big-endian counter that starts
at 0 when the engine's publisher starts, ``payload`` a msgpack ``KVEventBatch`` (an array
``[ts, events, data_parallel_rank]`` whose events are maps tagged by ``"type"``). A replay request to the
engine's ROUTER socket is ``[b"", start_seq]`` from a DEALER; the answer is one ``[b"", topic, seq, payload]``
per buffered batch with ``seq >= start_seq``, then ``[b"", b"", END_SEQ, b""]``.

These structs mirror vLLM's field for field: names, order, defaults and the ``array_like``/
``omit_defaults``/``tag`` options (``tests/test_kv_events_wire.py`` checks the bytes against vLLM's own
classes), so neither side needs vLLM installed. Like ``openai_http``, this is a leaf both ``engine_server``
and ``router`` import (msgspec only), so the format is defined once.
"""

from __future__ import annotations

from typing import Any

import msgspec

END_SEQ = (-1).to_bytes(8, "big", signed=True)

ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload; raises ``msgspec.DecodeError`` (or ``ValidationError``) on a malformed one."""
    return _decoder.decode(payload)


def decode_seq(seq_bytes: bytes) -> int:
    """The sequence frame as an int (-1 for the replay end marker)."""
    return int.from_bytes(seq_bytes, "big", signed=True)
