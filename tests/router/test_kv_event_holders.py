"""`PreciseIndex.match` walks a request's keys once for every replica (`Holders`), and answers exactly what
each replica's own `EngineBlockIndex.match` answers, whatever events came, and after replicas are replaced."""

from __future__ import annotations

import random

from kv_wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from router.features.hashing import token_block_hashes
from router.kv_events.holders import Holders
from router.kv_events.precise import PreciseIndex


def synced(index: PreciseIndex, name: str, block_size: int, model: str = "m"):
    sync = index.add_replica(name, block_size, model)
    sync.full_resync()
    sync.on_replay_end(ok=True)
    return sync


def per_replica(index: PreciseIndex, keys, names) -> dict[str, int]:
    """The reference: every replica's own index asked one by one."""
    return {n: index.replica(n).index.match(keys) for n in names}


def random_events(rng: random.Random, prompts: list[list[int]], bs: int, engine_hashes: list[int]):
    """Stores of random prompt prefixes (parents chained by engine hash), removes anywhere, rare clears."""
    r = rng.random()
    if r < 0.05:
        return [AllBlocksCleared()]
    if r < 0.35 and engine_hashes:
        return [BlockRemoved(block_hashes=rng.sample(engine_hashes, min(len(engine_hashes), rng.randrange(1, 6))),
                             medium="GPU")]
    ids = rng.choice(prompts)
    n = rng.randrange(1, len(ids) // bs + 1)
    hashes = [hash((tuple(ids[: (i + 1) * bs]), bs)) & (2**63 - 1) for i in range(n)]
    engine_hashes.extend(hashes)
    return [BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=ids[: n * bs], block_size=bs,
                        lora_id=None, medium="GPU", lora_name=None)]


def test_one_walk_equals_each_replicas_own_match_on_random_event_streams():
    rng = random.Random(0)
    index = PreciseIndex()
    names = [f"r{i}" for i in range(6)]
    seqs = dict.fromkeys(names, 0)
    for name in names:
        synced(index, name, 4)
    prompts = [[rng.randrange(8) for _ in range(rng.randrange(4, 48))] for _ in range(12)]
    hashes: dict[str, list[int]] = {n: [] for n in names}
    for step in range(3000):
        name = rng.choice(names)
        batch = KVEventBatch(ts=float(step), events=random_events(rng, prompts, 4, hashes[name]))
        index.replica(name).on_live(seqs[name], batch)
        seqs[name] += 1
        if step % 7 == 0:
            request = rng.choice(prompts)[: rng.randrange(0, 48)] + [rng.randrange(8) for _ in range(rng.randrange(3))]
            keys = token_block_hashes(request, 4, "m")
            subset = rng.sample(names, rng.randrange(1, len(names) + 1))
            got = index.match(keys, subset)
            assert {n: m.blocks for n, m in got.items()} == per_replica(index, keys, subset)
            assert {n: m.blocks for n, m in index.match(keys).items()} == per_replica(index, keys, names)


def test_a_replaced_or_removed_replica_leaves_nothing_behind_and_its_bit_is_reused():
    index = PreciseIndex()
    ids = list(range(16))
    keys = token_block_hashes(ids, 4, "m")
    ev = BlockStored(block_hashes=[1, 2, 3, 4], parent_block_hash=None, token_ids=ids, block_size=4, lora_id=None,
                     medium="GPU", lora_name=None)
    old = synced(index, "a", 4)
    old.on_live(0, KVEventBatch(ts=0.0, events=[ev]))
    synced(index, "b", 4).on_live(0, KVEventBatch(ts=0.0, events=[ev]))
    assert {n: m.blocks for n, m in index.match(keys).items()} == {"a": 4, "b": 4}
    synced(index, "a", 4)  # replaced: a fresh, empty index
    old.on_live(1, KVEventBatch(ts=1.0, events=[ev]))  # the old subscriber's late batch counts for nobody
    assert {n: m.blocks for n, m in index.match(keys).items()} == {"a": 0, "b": 4}
    index.remove_replica("b")
    synced(index, "c", 4)
    assert {n: m.blocks for n, m in index.match(keys).items()} == {"a": 0, "c": 0}


def test_replicas_of_another_block_size_or_model_are_asked_only_for_their_own_keys():
    index = PreciseIndex()
    ids = list(range(16))
    for name, bs, model in (("a", 4, "m"), ("b", 8, "m"), ("c", 4, "other")):
        keys = token_block_hashes(ids, bs, model)
        synced(index, name, bs, model).on_live(0, KVEventBatch(ts=0.0, events=[BlockStored(
            block_hashes=list(range(len(keys))), parent_block_hash=None, token_ids=ids, block_size=bs,
            lora_id=None, medium="GPU", lora_name=None)]))
    got = index.match(token_block_hashes(ids, 4, "m"), ["a", "b", "c"])
    assert {n: m.blocks for n, m in got.items()} == {"a": 4, "b": 0, "c": 0}


def test_depths_end_each_bit_where_its_replica_stops_holding():
    holders = Holders()
    a, b, c = holders.take_bit(), holders.take_bit(), holders.take_bit()
    for k in (10, 11, 12):
        holders.add(k, a)
    for k in (10, 12):  # b lacks 11: a hole ends its match, as in the engine
        holders.add(k, b)
    assert holders.depths([10, 11, 12, 13], a | b | c) == {a: 3, b: 1, c: 0}
    holders.discard(10, a)
    assert holders.depths([10, 11], a | b) == {a: 0, b: 1}
    assert holders.depths([], a) == {a: 0}
