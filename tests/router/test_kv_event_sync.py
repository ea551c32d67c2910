"""Sequence tracking without sockets: gaps ask for replays, replays repair, restarts resync, losses degrade."""

from __future__ import annotations

from kv_wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from router.features.hashing import token_block_hashes
from router.kv_events.index import EngineBlockIndex
from router.kv_events.sync import EventSync

BS = 2


def store(h: int, parent: int | None, tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=[h], parent_block_hash=parent, token_ids=tokens, block_size=BS,
                       lora_id=None, medium="GPU", lora_name=None)


class Engine:
    """A publisher's history: batch `i` stores block `i` (tokens [i, i]) as a root, numbered from 0."""

    def __init__(self, ts0: float = 1000.0) -> None:
        self.batches: list[KVEventBatch] = []
        self.ts0 = ts0

    def emit(self, *events) -> tuple[int, KVEventBatch]:
        b = KVEventBatch(ts=self.ts0 + len(self.batches), events=list(events))
        self.batches.append(b)
        return len(self.batches) - 1, b

    def emit_block(self, i: int) -> tuple[int, KVEventBatch]:
        return self.emit(store(i, None, [i, i]))

    def replay(self, start: int, buffer: int = 10_000):
        first = max(len(self.batches) - buffer, 0)
        return [(s, self.batches[s]) for s in range(max(start, first), len(self.batches))]


def new_sync() -> EventSync:
    return EventSync(EngineBlockIndex(BS, "m"))


def held(sync: EventSync, i: int) -> bool:
    return sync.index.match(token_block_hashes([i, i], BS, "m")) == 1


def run_replay(sync: EventSync, engine: Engine, start: int, buffer: int = 10_000) -> None:
    assert sync.replaying_from == start
    for seq, b in engine.replay(start, buffer):
        sync.on_replay(seq, b)
    sync.on_replay_end(ok=True)


def synced_sync(engine: Engine) -> EventSync:
    sync = new_sync()
    run_replay(sync, engine, sync.on_connected())
    assert sync.status == "synced"
    return sync


def test_in_order_batches_apply_and_keep_it_synced():
    engine = Engine()
    sync = synced_sync(engine)
    for i in range(3):
        assert sync.on_live(*engine.emit_block(i)) is None
    assert sync.status == "synced" and sync.next_seq == 3 and all(held(sync, i) for i in range(3))


def test_startup_replay_from_zero_catches_up_and_skips_live_duplicates():
    engine = Engine()
    for i in range(5):
        engine.emit_block(i)
    sync = synced_sync(engine)
    assert all(held(sync, i) for i in range(5))
    # Live copies of batches already replayed (they queued up while the replay ran) are skipped.
    assert sync.on_live(3, engine.batches[3]) is None and sync.on_live(4, engine.batches[4]) is None
    assert sync.stats.duplicates == 2 and sync.stats.restarts == 0 and sync.status == "synced"


def test_a_dropped_batch_is_detected_and_repaired_by_replay():
    engine = Engine()
    sync = synced_sync(engine)
    sync.on_live(*engine.emit_block(0))
    engine.emit(BlockRemoved(block_hashes=[0], medium="GPU"))  # seq 1: lost live
    start = sync.on_live(*engine.emit_block(2))
    assert start == 1 and sync.status == "stale" and sync.stats.gaps == 1
    run_replay(sync, engine, start)
    assert sync.status == "synced" and sync.next_seq == 3
    assert not held(sync, 0) and held(sync, 2)


def test_a_loss_beyond_the_replay_buffer_leaves_a_partial_subset_until_a_clear():
    engine = Engine()
    sync = synced_sync(engine)
    sync.on_live(*engine.emit_block(0))
    for i in range(1, 5):
        engine.emit_block(i)  # all lost live; the buffer keeps only the last 2
    start = sync.on_live(*engine.emit_block(5))
    run_replay(sync, engine, start, buffer=2)
    assert sync.status == "partial" and sync.stats.lost == 3
    # A subset: what was stored before the loss is dropped, what came after is known.
    assert not held(sync, 0) and not held(sync, 1) and held(sync, 4) and held(sync, 5)
    sync.on_live(*engine.emit(AllBlocksCleared(), store(9, None, [9, 9])))
    assert sync.status == "synced" and held(sync, 9) and not held(sync, 5)


def test_an_engine_restart_is_seen_as_a_sequence_going_back_and_resyncs():
    old = Engine(ts0=1000.0)
    sync = synced_sync(old)
    for i in range(4):
        sync.on_live(*old.emit_block(i))
    new = Engine(ts0=5000.0)  # restarted: empty cache, numbering from 0 again
    new.emit_block(7)
    start = sync.on_live(*new.emit_block(8))
    assert start == 0 and sync.stats.restarts == 1 and sync.status == "unsynced"
    run_replay(sync, new, start)
    assert sync.status == "synced" and sync.next_seq == 2
    assert held(sync, 7) and held(sync, 8) and not any(held(sync, i) for i in range(4))


def test_without_a_replay_answer_a_gap_degrades_to_partial():
    engine = Engine()
    sync = synced_sync(engine)
    sync.on_live(*engine.emit_block(0))
    engine.emit_block(1)
    sync.on_live(*engine.emit_block(2))
    sync.on_replay_end(ok=False)  # timed out, or no replay endpoint
    assert sync.status == "partial" and held(sync, 2) and not held(sync, 0)


def test_startup_without_replay_is_partial():
    sync = new_sync()
    sync.on_connected()
    sync.on_replay_end(ok=False)
    assert sync.status == "partial"


def test_a_first_live_message_past_zero_asks_for_the_beginning():
    engine = Engine()
    engine.emit_block(0)
    sync = new_sync()
    start = sync.on_live(*engine.emit_block(1))
    assert start == 0 and sync.status == "unsynced"
    run_replay(sync, engine, start)
    assert sync.status == "synced" and held(sync, 0) and held(sync, 1)


def test_a_disconnect_is_stale_and_the_reconnect_rebuilds_from_zero():
    engine = Engine()
    sync = synced_sync(engine)
    sync.on_live(*engine.emit_block(0))
    sync.on_disconnected()
    assert sync.status == "stale"
    run_replay(sync, engine, sync.on_connected())
    assert sync.status == "synced" and held(sync, 0) and sync.stats.resyncs == 2


def test_an_idle_probe_finds_a_lost_last_batch():
    engine = Engine()
    sync = synced_sync(engine)
    engine.emit_block(0)  # lost live, and nothing follows it
    start = sync.probe()
    assert start == 0
    run_replay(sync, engine, start)
    assert sync.status == "synced" and held(sync, 0)
    assert sync.probe() == 1
    sync.on_replay_end(ok=True)
    assert sync.status == "synced"


def test_a_failed_idle_probe_loses_nothing():
    engine = Engine()
    sync = synced_sync(engine)
    sync.on_live(*engine.emit_block(0))
    assert sync.probe() == 1
    sync.on_replay_end(ok=False)  # the replay endpoint did not answer this time
    assert sync.status == "synced" and held(sync, 0) and sync.stats.lost == 0


def test_a_gap_while_partial_stays_partial_after_repair():
    engine = Engine()
    for i in range(3):
        engine.emit_block(i)
    sync = new_sync()
    run_replay(sync, engine, sync.on_connected(), buffer=1)  # batches 0 and 1 are gone
    assert sync.status == "partial" and held(sync, 2)
    engine.emit_block(3)  # lost live, still in the buffer
    start = sync.on_live(*engine.emit_block(4))
    assert start == 3 and sync.status == "stale"
    run_replay(sync, engine, start)
    assert sync.status == "partial" and held(sync, 3) and held(sync, 4) and not held(sync, 0)
