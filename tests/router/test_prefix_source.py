"""`PrefixSource`: a request's exact per-replica matches, computed lazily, with block keys reused from a
previous prompt that shares blocks, never different from hashing from scratch."""

from __future__ import annotations

import random

import pytest

from kv_wire import BlockStored, KVEventBatch
from router.features.hashing import token_block_hashes
from router.features.tokenize import SimTokens
from router.kv_events import prefix_source
from router.kv_events.precise import PreciseIndex
from router.kv_events.prefix_source import PrefixSource


def test_reused_keys_equal_keys_hashed_from_scratch_for_growing_and_branching_prompts():
    source = PrefixSource(PreciseIndex(), SimTokens())
    rng = random.Random(0)
    for block_size in (1, 4, 16):
        prompts: list[list[int]] = [[rng.randrange(50) for _ in range(rng.randrange(0, 40))] for _ in range(3)]
        for _ in range(300):
            base = rng.choice(prompts)
            cut = rng.randrange(len(base) + 1)  # a prefix (a branch), then new tokens (a next turn)
            ids = base[:cut] + [rng.randrange(50) for _ in range(rng.randrange(0, 30))]
            prompts.append(ids)
            model = rng.choice(["m", "other"])
            assert source.keys(ids, block_size, model) == token_block_hashes(ids, block_size, model)


def synced_index(block_size: int) -> PreciseIndex:
    index = PreciseIndex()
    for name in ("a", "b"):
        sync = index.add_replica(name, block_size, "m")
        sync.full_resync()
        sync.on_replay_end(ok=True)
    return index


def test_a_request_match_counts_the_blocks_each_replica_holds_and_caps_cached_tokens():
    index = synced_index(4)
    tokens = SimTokens(chars_per_token=1)
    body = {"prompt": "abcdefghijklmnop"}  # 16 tokens: 4 blocks
    ids = tokens.prompt_ids(body, "completion")
    ev = BlockStored(block_hashes=[1, 2, 3, 4], parent_block_hash=None, token_ids=ids, block_size=4,
                     lora_id=None, medium="GPU", lora_name=None)
    index.replica("a").on_live(0, KVEventBatch(ts=1.0, events=[ev]))
    index.replica("b").on_live(0, KVEventBatch(ts=1.0, events=[BlockStored(
        block_hashes=[9], parent_block_hash=None, token_ids=ids[:4], block_size=4, lora_id=None, medium="GPU",
        lora_name=None)]))
    match = PrefixSource(index, tokens).for_request(body, "completion")
    assert {n: m.blocks for n, m in match.match().items()} == {"a": 4, "b": 1}
    assert match.cached_tokens("a") == 12  # the engine always computes the last token: 15 // 4 * 4
    assert match.cached_tokens("b") == 4
    assert match.cached_tokens("nobody") is None


def test_nothing_is_tokenized_until_asked_and_stale_replicas_are_not_trusted():
    index = synced_index(4)
    calls = []

    class Counting(SimTokens):
        def encode(self, text: str) -> list[int]:
            calls.append(text)
            return super().encode(text)

    match = PrefixSource(index, Counting(chars_per_token=1)).for_request({"prompt": "abcdefgh"}, "completion")
    assert calls == []
    index.replica("b").on_disconnected()
    assert match.cached_tokens("a") == 0 and match.cached_tokens("b") is None
    match.match()
    assert calls == ["abcdefgh"]  # computed once, kept


def test_many_sessions_sharing_a_system_prompt_reuse_their_own_history_with_exact_keys(monkeypatch):
    """More sessions than a probe keeps share the first blocks: the deep probes still find each one's
    previous turn (few blocks hashed), and the keys stay those hashed from scratch."""
    source = PrefixSource(PreciseIndex(), SimTokens(), per_probe=4)
    rng = random.Random(1)
    system = [rng.randrange(50) for _ in range(40)]
    sessions = [system + [rng.randrange(50) for _ in range(rng.randrange(0, 200))] for _ in range(20)]
    hashed = []

    def counting(ids, block_size, model, **kwargs):
        hashed.append(len(ids) // block_size)
        return token_block_hashes(ids, block_size, model, **kwargs)

    monkeypatch.setattr(prefix_source, "token_block_hashes", counting)
    for turn in range(6):
        for s in range(len(sessions)):
            sessions[s] = sessions[s] + [rng.randrange(50) for _ in range(rng.randrange(0, 30))]
            hashed.clear()
            assert source.keys(sessions[s], 4, "m") == token_block_hashes(sessions[s], 4, "m")
            if turn > 0:
                assert hashed[0] <= 30 // 4 + 2  # only the turn's new blocks (and the old last one)


def test_the_timed_computation_measure_uses_answers_as_the_lazy_one():
    def source_with_events() -> PrefixSource:
        index = synced_index(4)
        ids = SimTokens(chars_per_token=1).prompt_ids({"prompt": "abcdefghijklmnop"}, "completion")
        index.replica("a").on_live(0, KVEventBatch(ts=1.0, events=[BlockStored(
            block_hashes=[1, 2, 3, 4], parent_block_hash=None, token_ids=ids, block_size=4, lora_id=None,
            medium="GPU", lora_name=None)]))
        return PrefixSource(index, SimTokens(chars_per_token=1))

    for body, kind in (({"prompt": "abcdefghijklmnopq"}, "completion"), ({"prompt": "abcdxx"}, "completion"),
                       ({"messages": [{"role": "user", "content": "hi"}]}, "chat"), ({"prompt": 3}, "completion")):
        lazy = source_with_events().for_request(body, kind)
        timed = source_with_events().for_request(body, kind)
        assert all(t >= 0 for t in timed.compute_timed(lambda: 0.0))
        assert (timed.token_ids, timed.match()) == (lazy.token_ids, lazy.match())


def test_shared_blocks_counts_the_leading_equal_blocks():
    """`_shared_blocks` (whole compare first, else galloping) = the block-by-block count, capped by limit."""
    from router.kv_events.prefix_source import _shared_blocks

    rng = random.Random(14)
    for _ in range(2000):
        block = rng.choice([1, 2, 16])
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 80))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        if rng.random() < 0.3 and b:
            b[rng.randrange(len(b))] = 9  # a difference anywhere, the last block's too
        limit = rng.randrange(0, 100)
        naive = 0
        while (naive < limit and (naive + 1) * block <= min(len(a), len(b))
               and a[naive * block : (naive + 1) * block] == b[naive * block : (naive + 1) * block]):
            naive += 1
        assert _shared_blocks(a, b, block, limit) == naive


def _growing_chats(rng: random.Random, words: list[str]) -> list[list[dict]]:
    """Interleaved sessions sharing a system prompt, each turn a reply and a question (1-3 messages),
    some re-sent or with an edited history: the bodies a router sees, freshly parsed each time."""
    system = {"role": "system", "content": " ".join(rng.choice(words) for _ in range(60))}
    chats = [[system] for _ in range(5)]
    out = []
    for _ in range(60):
        s = rng.randrange(len(chats))
        msgs = chats[s]
        if rng.random() < 0.15 and len(msgs) > 2:
            msgs = [*msgs[:1], {"role": "user", "content": "edited"}, *msgs[2:]]
        elif rng.random() < 0.9:
            for role in ("assistant", "user")[rng.randrange(2):] + ("user",) * rng.randrange(2):
                content = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 40)))
                msgs = [*msgs, {"role": role, "content": content}]
        chats[s] = msgs
        out.append([dict(m) for m in msgs])
    return out


def _fresh_ids_and_keys(make_tokenizer, body: dict, block: int) -> tuple[list[int] | None, tuple[int, ...]]:
    ids = make_tokenizer().prompt_ids(body, "chat")  # a new tokenizer: nothing recent, every step walked
    return ids, token_block_hashes(ids or [], block, "m")


def test_request_ids_and_keys_equal_a_fresh_full_computation_for_sim_chats():
    rng = random.Random(5)
    source = PrefixSource(synced_index(16), SimTokens())
    words = ["cache", "block", "router", "ünï", "→", "42", "  ", "\n"]
    for msgs in _growing_chats(rng, words):
        body = {"model": "m", "messages": msgs}
        match = source.for_request(body, "chat")
        ids, keys = _fresh_ids_and_keys(SimTokens, body, 16)
        assert match.token_ids == ids
        assert source.keys(ids, 16, "m") == keys


def test_request_ids_and_keys_equal_a_fresh_full_computation_for_hf_chats():
    pytest.importorskip("transformers")
    from engine_server.tiny_model import build_tokenizer
    from router.features.tokenize import HFTokens

    tok = build_tokenizer()
    rng = random.Random(6)
    source = PrefixSource(synced_index(32), HFTokens(tok))
    words = ["cache", "block", "router's", "ünï", "→", "42", "  ", "\n", "it'll", "<|im_end|>"]
    for msgs in _growing_chats(rng, words):
        body = {"model": "m", "messages": msgs}
        match = source.for_request(body, "chat")
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = list(tok.encode(text, add_special_tokens=not text.startswith(tok.bos_token)))  # the engine's
        assert match.token_ids == ids
        assert source.keys(ids, 32, "m") == token_block_hashes(ids, 32, "m")
