"""Our KV event messages are vLLM's, byte for byte: decoded by vLLM's own classes, framed like its publisher."""

from __future__ import annotations

import os
import tempfile

import msgspec
import pytest
import zmq

import kv_wire as wire
from engine_server import kv_events as ours

vllm_kv = pytest.importorskip("vllm.distributed.kv_events")

HANG_GUARD_MS = 10_000


def sample_batch(mod) -> object:
    """The same logical batch built from our classes (`kv_wire`) or vLLM's."""
    return mod.KVEventBatch(ts=1700000000.25, events=[
        mod.BlockStored(block_hashes=[11, 2**64 - 1], parent_block_hash=None, token_ids=list(range(32)),
                        block_size=16, lora_id=None, medium="GPU", lora_name=None, group_idx=0),
        mod.BlockStored(block_hashes=[b"\x01" * 32], parent_block_hash=2**64 - 1, token_ids=[7] * 16,
                        block_size=16, lora_id=3, medium="GPU", lora_name="adapter",
                        extra_keys=[("adapter", "salt")], group_idx=0, session_id="s1"),
        mod.BlockRemoved(block_hashes=[11], medium="GPU", group_idx=0),
        mod.AllBlocksCleared(),
    ], data_parallel_rank=0)


def test_our_encoding_equals_vllms_byte_for_byte():
    enc = msgspec.msgpack.Encoder()
    assert wire.encode_batch(sample_batch(wire)) == enc.encode(sample_batch(vllm_kv))


def test_vllms_decoder_reads_our_messages_and_ours_reads_vllms():
    payload = wire.encode_batch(sample_batch(wire))
    theirs = msgspec.msgpack.Decoder(type=vllm_kv.KVEventBatch).decode(payload)
    assert theirs == sample_batch(vllm_kv)
    back = wire.decode_batch(msgspec.msgpack.Encoder().encode(sample_batch(vllm_kv)))
    assert back == sample_batch(wire)
    assert wire.decode_batch(payload) == sample_batch(wire)


def test_struct_fields_match_vllm():
    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEventBatch"):
        theirs = getattr(vllm_kv, name)
        mine = getattr(wire, name)
        assert mine.__struct_fields__ == theirs.__struct_fields__, name
        assert mine.__struct_defaults__ == theirs.__struct_defaults__, name
        assert mine.__struct_config__.tag == theirs.__struct_config__.tag
        assert mine.__struct_config__.array_like == theirs.__struct_config__.array_like
        assert mine.__struct_config__.omit_defaults == theirs.__struct_config__.omit_defaults
    assert wire.END_SEQ == vllm_kv.ZmqEventPublisher.END_SEQ


@pytest.fixture
def ipc_dir():
    with tempfile.TemporaryDirectory(prefix="kvw") as d:
        yield d


def _frames(pub_cls, d: str, label: str, make_batch, **kwargs):
    """Publish two batches with `pub_cls`, return the live frames and a replay's frames."""
    ctx = zmq.Context()
    endpoint, replay = f"ipc://{os.path.join(d, label)}.pub", f"ipc://{os.path.join(d, label)}.replay"
    pub = pub_cls(endpoint=endpoint, replay_endpoint=replay, topic="kv", **kwargs)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.setsockopt(zmq.RCVTIMEO, HANG_GUARD_MS)
    sub.connect(endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, HANG_GUARD_MS)
    dealer.connect(replay)
    try:
        # Slow joiner: the first batches may be lost live, so read everything back through a replay.
        pub.publish(make_batch())
        pub.publish(make_batch())
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while True:
            frames = dealer.recv_multipart()
            replayed.append(frames)
            if frames[2] == wire.END_SEQ:
                break
            if len(replayed) > 3:  # the second batch may not be published yet: ask again
                break
        # A live message once the subscription is surely up.
        live = []
        for _ in range(200):
            pub.publish(make_batch())
            if sub.poll(50):
                live = sub.recv_multipart()
                break
        return live, replayed
    finally:
        pub.shutdown()
        sub.close(0)
        dealer.close(0)
        ctx.term()


class _OursAdapter:
    def __init__(self, **kwargs):
        self.p = ours.KVEventPublisher(ours.KVEventsSettings(**kwargs))

    def publish(self, batch):
        self.p.publish(batch)
        self.p.flush()

    def shutdown(self):
        self.p.shutdown()


class _VllmAdapter:
    def __init__(self, **kwargs):
        self.p = vllm_kv.ZmqEventPublisher(data_parallel_rank=0, **kwargs)

    def publish(self, batch):
        self.p.publish(batch)
        self.p._event_queue.join()  # all sent and buffered

    def shutdown(self):
        self.p.shutdown()


def test_framing_equals_vllms_publisher(ipc_dir):
    """Live [topic, seq, payload] and replay [b"", topic, seq, payload] ... end marker, as vLLM sends."""
    live_ours, replay_ours = _frames(_OursAdapter, ipc_dir, "ours", lambda: sample_batch(wire))
    live_vllm, replay_vllm = _frames(_VllmAdapter, ipc_dir, "vllm", lambda: sample_batch(vllm_kv))
    assert live_ours[0] == live_vllm[0] == b"kv"
    assert live_ours[2] == live_vllm[2]  # same payload bytes
    assert len(live_ours[1]) == len(live_vllm[1]) == 8
    assert replay_ours == replay_vllm
    assert replay_ours[0] == [b"", b"kv", (0).to_bytes(8, "big"), live_ours[2]]
    assert replay_ours[-1] == [b"", b"", wire.END_SEQ, b""]


async def test_the_router_hub_follows_vllms_own_publisher_and_its_restart(ipc_dir):
    """vLLM's ZmqEventPublisher on one side, our KVEventHub on the other: stores, removes, restart."""
    import asyncio

    from router.features.hashing import token_block_hashes
    from router.kv_events.subscriber import EventSource, KVEventHub

    endpoint, replay = f"ipc://{ipc_dir}/v.pub", f"ipc://{ipc_dir}/v.replay"
    source = EventSource(replica="v", endpoint=endpoint, replay_endpoint=replay, block_size=2, model="m")

    def stored(hashes, parent, tokens):
        return vllm_kv.BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                                   block_size=2, lora_id=None, medium="GPU", lora_name=None, group_idx=0)

    async def until(cond) -> None:
        async def loop() -> None:
            while not cond():
                await asyncio.sleep(0.01)
        await asyncio.wait_for(loop(), HANG_GUARD_MS / 1000)

    pub = vllm_kv.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint, replay_endpoint=replay)
    try:
        async with KVEventHub(idle_probe_s=0.05) as hub:
            sync = hub.add(source)
            pub.publish(vllm_kv.KVEventBatch(ts=1.0, events=[stored([b"h1", b"h2"], None, [1, 2, 3, 4])]))
            pub.publish(vllm_kv.KVEventBatch(ts=2.0, events=[stored([b"h3"], b"h2", [5, 6])]))
            pub.publish(vllm_kv.KVEventBatch(ts=3.0, events=[vllm_kv.BlockRemoved(block_hashes=[b"h2"],
                                                                                  medium="GPU")]))
            await until(lambda: sync.next_seq == 3 and sync.status == "synced")
            assert hub.index.match(token_block_hashes([1, 2, 3, 4, 5, 6], 2, "m"))["v"].blocks == 1
            assert len(sync.index) == 2

            pub.shutdown()  # the engine restarts: a new publisher, numbering from 0, an empty cache
            pub = vllm_kv.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint, replay_endpoint=replay)
            pub.publish(vllm_kv.KVEventBatch(ts=10.0, events=[stored([b"k1"], None, [7, 7])]))
            await until(lambda: sync.stats.resyncs >= 2 and sync.next_seq == 1 and sync.status == "synced")
            assert len(sync.index) == 1
            assert hub.index.match(token_block_hashes([7, 7, 1], 2, "m"))["v"].blocks == 1
            assert hub.index.match(token_block_hashes([1, 2], 2, "m"))["v"].blocks == 0
    finally:
        pub.shutdown()
