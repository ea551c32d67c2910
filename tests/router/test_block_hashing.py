"""Block hashing: a chain of per-block hashes that identifies prompt prefixes."""

import random

import pytest

from router.features import chat_prompt_text, features_from_body
from router.features.hashing import (
    HashingConfig,
    PrefixChains,
    RecentChains,
    block_hashes,
    token_block_hashes,
)

TEXT = "".join(chr(ord("a") + i % 26) for i in range(1000))


def test_only_full_blocks_are_hashed():
    assert len(block_hashes("x" * 63, 64, "m")) == 0
    assert len(block_hashes("x" * 64, 64, "m")) == 1
    assert len(block_hashes("x" * 191, 64, "m")) == 2


def test_a_trailing_partial_block_does_not_change_the_chain():
    assert block_hashes(TEXT[:640], 64, "m") == block_hashes(TEXT[:700], 64, "m")


def test_a_longer_prompt_extends_the_chain_of_its_prefix():
    short, long = block_hashes(TEXT[:320], 64, "m"), block_hashes(TEXT, 64, "m")
    assert long[: len(short)] == short
    assert len(long) == 1000 // 64


def test_a_hash_stands_for_the_whole_prefix_not_just_its_block():
    a = block_hashes("A" * 64 + "same" * 16, 64, "m")
    b = block_hashes("B" * 64 + "same" * 16, 64, "m")
    assert a[1] != b[1]  # identical second blocks, different parents


def test_the_model_name_seeds_the_chain():
    assert block_hashes(TEXT, 64, "model-a") != block_hashes(TEXT, 64, "model-b")
    assert set(block_hashes(TEXT, 64, "model-a")).isdisjoint(block_hashes(TEXT, 64, "model-b"))


def test_hashes_are_stable_across_processes():
    # Pinned values: a change here breaks indexes shared between router replicas or restarts.
    assert block_hashes("abcd" * 16, 64, "m") == (8400209391390312506,)


def test_blocks_are_cut_by_characters_not_bytes():
    ascii_then_wide = block_hashes("a" * 64 + "é" * 64, 64, "m")
    assert len(ascii_then_wide) == 2
    assert block_hashes("a" * 64, 64, "m")[0] == ascii_then_wide[0]


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        block_hashes(TEXT, 0, "m")


def test_token_ids_hash_in_blocks_of_ids_under_their_own_seed():
    ids = list(range(100))
    chain = token_block_hashes(ids, 16, "m")
    assert len(chain) == 6
    assert token_block_hashes(ids[:48], 16, "m") == chain[:3]
    assert token_block_hashes(ids, 16, "other") != chain


def test_hashing_config_validates_and_derives_token_blocks():
    assert HashingConfig().block_tokens == 16.0
    assert HashingConfig(block_chars=128, chars_per_token=4).token_block_size == 32
    with pytest.raises(ValueError):
        HashingConfig(block_chars=0)
    with pytest.raises(ValueError):
        HashingConfig(chars_per_token=0)


def test_prefix_chains_give_exactly_the_chain_of_the_whole_text():
    """The simulator's cached-prefix hashing is `block_hashes`, for every prefix cut and text length."""
    rng = random.Random(7)
    chains = PrefixChains(max_entries=4)  # small: the cache is dropped and refilled along the way
    for _ in range(300):
        shared = "".join(rng.choice("abcé✓ \n") for _ in range(rng.randrange(0, 300)))
        text = shared + "".join(rng.choice("xyz") for _ in range(rng.randrange(0, 200)))
        block = rng.choice([1, 7, 64])
        expected = block_hashes(text, block, "m")
        assert chains.block_hashes(text, len(shared), block, "m") == expected
        assert chains.block_hashes(text, len(shared), block, "m") == expected  # from the cache


def test_chat_features_with_prefix_chains_match_the_plain_path():
    body = {"model": "m", "messages": [{"role": "system", "content": "s" * 500},
                                       {"role": "user", "content": "q" * 130}]}
    chains = PrefixChains()
    plain = features_from_body(body, "chat", "r", HashingConfig())
    for _ in range(2):
        assert features_from_body(body, "chat", "r", HashingConfig(), prefix_chains=chains) == plain


def test_recent_chains_give_exactly_the_chain_of_the_whole_text():
    """The live router's reuse of a recent prompt's chain is `block_hashes`, whatever the ends probed."""
    rng = random.Random(14)
    chains = RecentChains(max_entries=8)  # small: entries are pushed out along the way
    texts: list[str] = []
    for _ in range(400):
        base = rng.choice(texts) if texts and rng.random() < 0.7 else ""
        text = base + "".join(rng.choice("abcé✓ \n") for _ in range(rng.randrange(0, 300)))
        block = rng.choice([1, 7, 64])
        ends = sorted({len(text), len(base), rng.randrange(0, len(text) + 1)}, reverse=True)
        assert chains.block_hashes(text, block, "m", ends) == block_hashes(text, block, "m")
        texts.append(text)


def test_recent_chains_reuse_only_a_prompt_whose_text_is_this_ones():
    """Two prompts ending their aligned prefix with the same block but differing before it: no reuse."""
    chains = RecentChains()
    first = "a" * 64 + "b" * 64
    chains.block_hashes(first, 64, "m", [len(first)])
    other = "c" * 64 + "b" * 64 + "tail" * 20
    assert chains.block_hashes(other, 64, "m", [len(other), 128]) == block_hashes(other, 64, "m")


def test_chat_turns_hash_alike_with_the_live_routers_recent_chains():
    """`features_from_body` (which reuses recent chains for chats) equals hashing each text whole."""
    rng = random.Random(3)
    messages = [{"role": "system", "content": "s" * 300}]
    for _ in range(12):
        messages = messages + [{"role": "user", "content": "q" * rng.randrange(1, 200)}]
        body = {"model": "m", "messages": messages}
        got = features_from_body(body, "chat", "r", HashingConfig())
        assert got.block_hashes == block_hashes(chat_prompt_text(messages), 64, "m")
        messages = messages + [{"role": "assistant", "content": "a" * rng.randrange(1, 200)}]


def test_recent_chains_keep_one_entry_per_growing_prompt():
    chains = RecentChains()
    text = ""
    for turn in range(10):
        start = len(text)
        text += f"turn {turn} " * 20
        assert chains.block_hashes(text, 16, "m", [len(text), start]) == block_hashes(text, 16, "m")
        assert len(chains._recent) == 1
