"""Specification of the simulated paged KV cache (vLLM v1 block pool semantics) and its tokenizer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_server.sim.kv_cache import KVCache, block_hashes
from engine_server.sim.tokenizer import SimTokenizer

BS = 4  # small blocks keep the examples readable


def fill(cache: KVCache, rid: str, tokens: list[int]) -> list[int]:
    """Allocate and publish a request's blocks as if its whole sequence had been computed."""
    hashes = block_hashes(tokens, cache.block_size)
    hit = cache.lookup(hashes, len(tokens))
    assert cache.allocate(rid, len(tokens), hit)
    cache.cache_full_blocks(rid, hashes, len(tokens))
    return hashes


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_prefix_stable_on_chunk_boundaries() -> None:
    tok = SimTokenizer(chars_per_token=4)
    text = "The quick brown fox jumps over the lazy dog"
    assert tok.encode(text[:20]) == tok.encode(text)[:5]
    assert tok.encode(text) == tok.encode(text)
    assert tok.count_tokens(text) == len(tok.encode(text)) == -(-len(text) // 4)


def test_output_tokens_retokenize_to_the_same_ids() -> None:
    tok = SimTokenizer()
    stream = tok.output_stream(seed=7)
    pieces = [stream.next_token() for _ in range(20)]
    assert all(len(text) == 4 for _, text in pieces)
    assert tok.encode("".join(text for _, text in pieces)) == [i for i, _ in pieces]


# ------------------------------------------------------------------------------------------ hash chain


def test_same_prefix_gives_same_block_hashes() -> None:
    a = block_hashes(list(range(10)) + [100, 101], BS)
    b = block_hashes(list(range(10)) + [200, 201], BS)
    assert a[:2] == b[:2]  # blocks [0..3], [4..7] are shared
    assert a[2] != b[2]  # block [8, 9, x, y] differs


def test_changed_early_token_changes_every_later_hash() -> None:
    base = list(range(16))
    changed = [99] + base[1:]
    a, b = block_hashes(base, BS), block_hashes(changed, BS)
    assert all(x != y for x, y in zip(a, b, strict=True))  # identical blocks 1..3 still hash differently


def test_partial_block_has_no_hash() -> None:
    assert len(block_hashes(list(range(11)), BS)) == 2


def test_hit_needs_the_chain_from_the_first_block() -> None:
    cache = KVCache(num_blocks=8, block_size=BS)
    fill(cache, "a", list(range(12)))
    other_start = [50, 51, 52, 53] + list(range(4, 12)) + [0]
    assert cache.lookup(block_hashes(other_start, BS), len(other_start)) == []


# ----------------------------------------------------------------------------------- hits and capacity


def test_lookup_leaves_the_last_token_to_compute() -> None:
    cache = KVCache(num_blocks=8, block_size=BS)
    tokens = list(range(12))
    hashes = fill(cache, "a", tokens)
    cache.free("a")
    assert len(cache.lookup(hashes, 12)) == 2  # fully cached prompt: 11 tokens max -> 2 whole blocks
    longer = tokens + [77]
    assert len(cache.lookup(block_hashes(longer, BS), 13)) == 3


def test_freed_blocks_stay_hittable_until_reallocated() -> None:
    cache = KVCache(num_blocks=4, block_size=BS)
    hashes = fill(cache, "a", list(range(8)) + [1])
    cache.free("a")
    assert cache.num_used_blocks == 0
    hit = cache.lookup(hashes, 9)
    assert len(hit) == 2
    assert cache.allocate("b", 9, hit)  # 2 shared blocks + 1 new
    assert cache.num_used_blocks == 3
    assert all(b.ref_cnt == 1 for b in hit)


def test_shared_blocks_are_reference_counted() -> None:
    cache = KVCache(num_blocks=8, block_size=BS)
    tokens = list(range(9))
    hashes = fill(cache, "a", tokens)
    hit = cache.lookup(hashes, 9)
    assert cache.allocate("b", 9, hit)
    assert [b.ref_cnt for b in hit] == [2, 2]
    cache.free("a")
    assert cache.num_used_blocks == 3  # 2 shared + b's own tail block
    cache.free("b")
    assert cache.num_used_blocks == 0


def test_least_recently_freed_is_evicted_first() -> None:
    cache = KVCache(num_blocks=4, block_size=BS)
    ha = fill(cache, "a", list(range(8)))
    hb = fill(cache, "b", list(range(100, 108)))
    cache.free("a")
    cache.free("b")
    assert cache.allocate("c", 8)  # takes the two least recently freed blocks: a's
    assert not any(cache.is_cached(h) for h in ha)
    assert all(cache.is_cached(h) for h in hb)
    assert cache.stats.evictions == 2


def test_tail_blocks_are_evicted_before_the_prefix() -> None:
    cache = KVCache(num_blocks=3, block_size=BS)
    hashes = fill(cache, "a", list(range(12)))
    blocks = cache.req_blocks("a")
    cache.free("a")
    assert cache.free_queue() == blocks[::-1]  # released in reverse order
    assert cache.allocate("b", 1)  # one new block evicts a's last block
    assert [cache.is_cached(h) for h in hashes] == [True, True, False]
    assert len(cache.lookup(hashes, 13)) == 2


def test_allocation_beyond_capacity_fails_without_side_effects() -> None:
    cache = KVCache(num_blocks=4, block_size=BS)
    fill(cache, "a", list(range(9)))  # 3 blocks
    assert not cache.allocate("b", 8)  # needs 2, 1 free
    assert cache.req_blocks("b") == []
    assert cache.num_used_blocks == 3


def test_eviction_happens_when_the_cache_is_full() -> None:
    cache = KVCache(num_blocks=8, block_size=BS)
    first = fill(cache, "r0", list(range(16)))
    cache.free("r0")
    for i in range(1, 6):
        fill(cache, f"r{i}", [1000 * i + t for t in range(16)])
        cache.free(f"r{i}")
        assert cache.num_used_blocks == 0
        assert cache.num_cached_blocks <= 8
    assert cache.stats.evictions > 0
    assert cache.lookup(first, 17) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(1, 30)), max_size=40))
def test_block_accounting_invariants(ops: list[tuple[bool, int, int]]) -> None:
    """Any mix of allocations (with prefix hits) and frees keeps usage bounded and the books balanced."""
    cache = KVCache(num_blocks=10, block_size=BS)
    live: set[str] = set()
    for n, (do_free, prefix, length) in enumerate(ops):
        if do_free and live:
            cache.free(live.pop())
        else:
            rid = f"r{n}"
            tokens = [prefix] * 4 + list(range(length))
            hashes = block_hashes(tokens, BS)
            if cache.allocate(rid, len(tokens), cache.lookup(hashes, len(tokens))):
                cache.cache_full_blocks(rid, hashes, len(tokens))
                live.add(rid)
        refs = sum(b.ref_cnt for b in cache.blocks)
        assert refs == sum(len(cache.req_blocks(r)) for r in live)
        assert 0 <= cache.num_used_blocks <= cache.num_blocks
        assert cache.num_used_blocks == sum(1 for b in cache.blocks if b.ref_cnt > 0)
        assert 0.0 <= cache.usage <= 1.0
        assert all(cache.blocks[i].ref_cnt == 0 for i in cache.free_queue())
