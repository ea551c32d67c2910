"""The event-fed block index: worked example, the engine's corner cases, and equality with the sim's cache."""

from __future__ import annotations

import doctest
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_server.sim.kv_cache import block_hashes as sim_block_hashes
from engine_server.sim.scheduler import Scheduler, SchedulerConfig, SimRequest
from engine_server.sim.timing import get_profile
from engine_server.sim.tokenizer import SimTokenizer
from kv_wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, decode_batch, encode_batch
from router.features.hashing import token_block_hashes
from router.kv_events.index import EngineBlockIndex, chain_key

MODEL = "m"


def stored(hashes, parent, tokens, bs=2, **kw) -> BlockStored:
    fields = dict(lora_id=None, medium="GPU", lora_name=None)
    fields.update(kw)
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=bs, **fields)


def removed(*hashes, **kw) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium=kw.pop("medium", "GPU"), **kw)


def keys(tokens, bs=2, model=MODEL):
    return token_block_hashes(tokens, bs, model)


def test_the_docstring_examples_run():
    import router.kv_events.index
    import router.kv_events.precise

    for module in (router.kv_events.index, router.kv_events.precise):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_worked_example_from_the_docstring():
    idx = EngineBlockIndex(block_size=2, model=MODEL)
    idx.apply(stored([101, 102], None, [1, 2, 3, 4]))
    idx.apply(stored([203], 102, [5, 6]))
    assert idx.match(keys([1, 2, 3, 4, 5, 6, 7])) == 3
    idx.apply(removed(102))
    assert idx.match(keys([1, 2, 3, 4, 5, 6])) == 1
    assert len(idx) == 2


def test_keys_are_the_request_side_hash_chain():
    chain = keys(list(range(8)), bs=4)
    assert chain_key(chain[0], [4, 5, 6, 7]) == chain[1]


def test_engine_hashes_are_opaque_any_seed_gives_the_same_keys():
    a, b = EngineBlockIndex(2, MODEL), EngineBlockIndex(2, MODEL)
    a.apply(stored([1, 2], None, [9, 9, 8, 8]))
    b.apply(stored([b"x" * 32, b"y" * 32], None, [9, 9, 8, 8]))
    assert a.keys() == b.keys() and a.match(keys([9, 9, 8, 8])) == 2


def test_a_child_stored_after_its_parent_was_evicted_is_held_but_unreachable():
    idx = EngineBlockIndex(2, MODEL)
    idx.apply(stored([1], None, [1, 1]))
    idx.apply(removed(1))
    idx.apply(stored([2], 1, [2, 2]))  # parent's key comes from memory
    assert idx.match(keys([1, 1, 2, 2])) == 0
    idx.apply(stored([1], None, [1, 1]))  # the parent is computed again
    assert idx.match(keys([1, 1, 2, 2])) == 2


def test_a_store_with_an_unknown_parent_is_unresolved_and_never_matches():
    idx = EngineBlockIndex(2, MODEL)
    idx.apply(stored([5, 6], 999, [1, 2, 3, 4]))
    assert len(idx) == 2 and idx.keys() == set() and idx.stats.unresolved == 2
    idx.apply(removed(5, 6))
    assert len(idx) == 0 and idx.stats.unknown_removes == 0


def test_two_copies_of_one_block_need_two_removes():
    idx = EngineBlockIndex(2, MODEL)
    idx.apply(stored([1], None, [1, 1]))
    idx.apply(stored([1], None, [1, 1]))
    idx.apply(removed(1))
    assert idx.match(keys([1, 1])) == 1
    idx.apply(removed(1))
    assert idx.match(keys([1, 1])) == 0


def test_all_blocks_cleared_empties_but_keeps_the_hash_memory():
    idx = EngineBlockIndex(2, MODEL)
    idx.apply(stored([1], None, [1, 1]))
    idx.apply(AllBlocksCleared())
    assert len(idx) == 0 and idx.match(keys([1, 1])) == 0
    idx.apply(stored([2], 1, [2, 2]))
    idx.apply(stored([1], None, [1, 1]))
    assert idx.match(keys([1, 1, 2, 2])) == 2


@pytest.mark.parametrize("event", [
    stored([1], None, [1, 1], group_idx=1),
    stored([1], None, [1, 1], medium="CPU"),
    stored([1], None, [1, 1, 1, 1], bs=4),
    stored([1, 2], None, [1, 1]),  # token count does not match the hashes
])
def test_other_groups_tiers_and_block_sizes_are_ignored(event):
    idx = EngineBlockIndex(2, MODEL)
    idx.apply(event)
    assert len(idx) == 0 and idx.stats.ignored == 1


def test_lora_blocks_are_rooted_at_the_adapter_name_and_extra_keys_never_match_plain_tokens():
    idx = EngineBlockIndex(2, MODEL)
    idx.apply(stored([1], None, [1, 1], lora_id=1, lora_name="ad", extra_keys=[("ad",)]))
    assert idx.match(keys([1, 1], model="ad")) == 1
    assert idx.match(keys([1, 1])) == 0
    idx.apply(stored([2], None, [3, 3], extra_keys=[("salt",)]))
    assert idx.match(keys([3, 3])) == 0 and len(idx.keys()) == 2


def test_memory_is_bounded():
    idx = EngineBlockIndex(2, MODEL, memory=3)
    for h in range(10):
        idx.apply(stored([h], None, [h, h]))
        idx.apply(removed(h))
    assert len(idx._removed) == 3


# ------------------------------------------------------------------ the sim engine's cache, event-fed

BS = 4


def sim_workload(seed: int, n_requests: int, num_blocks: int, aborts: bool, resets: bool):
    """Run a random shared-prefix workload through the pure sim scheduler with KV events on.

    Yields after every step: (scheduler, events of that step).
    """
    rng = random.Random(seed)
    cfg = SchedulerConfig(num_blocks=num_blocks, max_num_seqs=4, max_num_batched_tokens=24,
                          max_model_len=num_blocks * BS, block_size=BS)
    sched = Scheduler(cfg, get_profile("instant"))
    sched.kv.enable_events(lambda rid: sched._seqs[rid].token_ids)
    tok = SimTokenizer()
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 14))] for _ in range(3)]
    for i in range(n_requests):
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
        max_tokens = rng.randrange(1, 6)
        if len(prompt) + max_tokens <= cfg.effective_max_model_len:
            sched.add(SimRequest(f"r{i}", prompt, max_tokens, tok.output_stream(i)))
        for _ in range(rng.randrange(0, 3)):
            if sched.has_work:
                sched.step()
                yield sched, sched.kv.take_events()
        if aborts and sched.running and rng.random() < 0.2:
            sched.abort(rng.choice(sched.running).req.request_id)
        if resets and rng.random() < 0.1:
            sched.kv.reset_prefix_cache()
            yield sched, sched.kv.take_events()
    while sched.has_work:
        sched.step()
        yield sched, sched.kv.take_events()


def over_the_wire(events) -> list:
    """The engine's events as the router decodes them (encoded by the engine's publisher code)."""
    batch = KVEventBatch(ts=0.0, events=events, data_parallel_rank=0)
    return decode_batch(encode_batch(batch)).events


def assert_index_equals_cache(idx: EngineBlockIndex, sched: Scheduler, probes) -> None:
    kv = sched.kv
    assert len(idx) == kv.num_cached_blocks
    assert all(kv.is_cached(h) for h in idx.engine_hashes())
    assert idx.stats.unresolved == 0
    for tokens in probes:
        engine = len(kv.lookup(sim_block_hashes(tokens, BS), len(tokens) + 1))
        assert idx.match(token_block_hashes(tokens, BS, MODEL)) == engine, tokens


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 25), num_blocks=st.integers(4, 24),
       aborts=st.booleans(), resets=st.booleans())
def test_index_fed_by_sim_events_equals_the_sim_cache(seed, n, num_blocks, aborts, resets):
    """After every step, the index holds exactly the sim's cached blocks and matches every prompt alike."""
    idx = EngineBlockIndex(BS, MODEL)
    seen: dict[str, list[int]] = {}  # every sequence's tokens, the latest seen (finished ones too)
    for sched, events in sim_workload(seed, n, num_blocks, aborts, resets):
        idx.apply_all(over_the_wire(events))
        seen.update((rid, list(s.token_ids)) for rid, s in sched._seqs.items())
        assert_index_equals_cache(idx, sched, seen.values())
