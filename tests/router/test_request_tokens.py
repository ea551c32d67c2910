"""The router tokenizes a request exactly as the engine will (sim rule and a HF tokenizer + chat template),
and its prefix caches never change the answer."""

from __future__ import annotations

import random

import pytest

from engine_server.sim.backend import SimBackend, SimConfig
from router.features.tokenize import HFTokens, SimTokens, first_prompt, plain_messages

WORDS = ["alpha", "beta", "gamma", "delta", " ", "\n", "ünï", "→", "<|im_start|>", "tool", "42", "  "]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(n))


def random_chat(rng: random.Random, turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": random_text(rng, 20)}]
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        content = random_text(rng, rng.randrange(1, 40))
        msgs.append({"role": role, "content": content if rng.random() < 0.7 else [{"type": "text", "text": content}]})
    return msgs


def engine_plain(msgs: list[dict]) -> list[dict]:
    """What the engine server hands its template (content parts joined)."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])}
            for m in msgs]


@pytest.mark.parametrize("chars_per_token", [1, 4, 7])
def test_sim_rule_matches_the_sim_engine_for_growing_chats(chars_per_token):
    sim = SimBackend(SimConfig(model_name="m", chars_per_token=chars_per_token))
    tokens = SimTokens(chars_per_token=chars_per_token)
    rng = random.Random(chars_per_token)
    for session in range(5):
        msgs = random_chat(rng, 1)
        for _ in range(6):  # each turn re-sends the history plus one message (the prefix cache's case)
            tools = [{"type": "function", "function": {"name": "f"}}] if session % 2 else None
            body = {"messages": msgs, **({"tools": tools} if tools else {})}
            expected = sim.encode(sim.render_chat(engine_plain(msgs), tools))
            assert tokens.prompt_ids(body, "chat") == expected
            msgs = msgs + random_chat(rng, 1)[1:]


def test_sim_completion_prompts_text_batches_and_ids():
    sim = SimBackend(SimConfig(model_name="m"))
    tokens = SimTokens()
    assert tokens.prompt_ids({"prompt": "hello world, again"}, "completion") == sim.encode("hello world, again")
    assert tokens.prompt_ids({"prompt": ["first one", "second"]}, "completion") == sim.encode("first one")
    assert tokens.prompt_ids({"prompt": [5, 6, 7]}, "completion") == [5, 6, 7]
    assert tokens.prompt_ids({"prompt": [[5, 6], [7]]}, "completion") == [5, 6]


def test_shapes_the_engine_rejects_give_none():
    tokens = SimTokens()
    assert tokens.prompt_ids({"prompt": 3}, "completion") is None
    assert tokens.prompt_ids({"prompt": [1, "a"]}, "completion") is None
    assert tokens.prompt_ids({"messages": []}, "chat") is None
    assert tokens.prompt_ids({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "chat") is None
    assert plain_messages({"messages": "x"}) is None and first_prompt({}) is None


@pytest.fixture(scope="module")
def hf() -> HFTokens:
    pytest.importorskip("transformers")
    from engine_server.tiny_model import build_tokenizer

    return HFTokens(build_tokenizer())


def vllm_backend_ids(tok, text: str) -> list[int]:
    """`VllmBackend.encode`'s rule: BOS unless the text starts with it."""
    return list(tok.encode(text, add_special_tokens=not text.startswith(tok.bos_token)))


def test_hf_pieces_are_exact_for_the_tiny_models_tokenizer(hf):
    assert hf.pieces_exact  # special tokens split the text, so old turns are a cache lookup


def test_hf_chat_ids_equal_the_engines_for_growing_chats(hf):
    rng = random.Random(0)
    for _ in range(5):
        msgs = random_chat(rng, 1)
        for _ in range(6):
            text = hf.tok.apply_chat_template(engine_plain(msgs), tokenize=False, add_generation_prompt=True)
            assert hf.prompt_ids({"messages": msgs}, "chat") == vllm_backend_ids(hf.tok, text)
            msgs = msgs + random_chat(rng, 1)[1:]


def test_hf_completion_ids_equal_the_engines(hf):
    rng = random.Random(1)
    for _ in range(20):
        text = random_text(rng, rng.randrange(1, 60))
        assert hf.prompt_ids({"prompt": text}, "completion") == vllm_backend_ids(hf.tok, text)


def test_hf_without_exact_pieces_still_answers_exactly(hf):
    plain = HFTokens(hf.tok)
    plain.pieces_exact = False  # as for a tokenizer whose pieces do not concatenate
    text = "<|im_start|>user\nhi there<|im_end|>\n"
    assert plain.encode(text) == plain.encode(text) == vllm_backend_ids(hf.tok, text)


def test_the_special_token_trie_splits_as_a_longest_first_alternation():
    import re

    from router.features.tokenize import trie_pattern

    words = ["<|a|>", "<|ab|>", "<s>", "</s>", "<|reserved_1|>", "<|reserved_10|>", "x"]
    trie = re.compile("(" + trie_pattern(words) + ")")
    flat = re.compile("(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + ")")
    rng = random.Random(0)
    pieces = ["<|a|>", "<|ab|>", "<|a", "<s>", "</s", "x", "y", "<|reserved_1|>", "<|reserved_10|>", "|>", "<"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(10))
        assert trie.split(text) == flat.split(text), text


@pytest.mark.parametrize("chars_per_token", [1, 3, 4, 7])
def test_sim_chats_encoded_piece_by_piece_equal_the_whole_texts_chunks(chars_per_token):
    """Pieces of any length (shorter than a chunk too), interleaved sessions, repeated messages: the
    cached per-piece ids always give `chunk_ids` of the joined text."""
    from kv_wire import sim_tokens

    tokens = SimTokens(chars_per_token=chars_per_token, cache_prompts=4)  # a small cache: evictions too
    rng = random.Random(chars_per_token)
    sessions = [random_chat(rng, 1) for _ in range(6)]
    for _ in range(120):
        s = rng.randrange(len(sessions))
        short = {"role": rng.choice(["user", "assistant"]), "content": rng.choice(["", "a", "ok", "→"])}
        sessions[s] = sessions[s] + rng.choice([random_chat(rng, 1)[1:], [short]])
        body = {"messages": sessions[s]}
        if rng.random() < 0.2:
            body["tools"] = [{"type": "function", "function": {"name": "f"}}]
        text = sim_tokens.render_chat(engine_plain(sessions[s]), body.get("tools"))
        assert tokens.prompt_ids(body, "chat") == sim_tokens.chunk_ids(text, chars_per_token,
                                                                       sim_tokens.VOCAB_SIZE, 0)


def test_sim_chunk_ids_are_each_chunks_id_for_ascii_and_other_text():
    from kv_wire import sim_tokens

    rng = random.Random(5)
    for _ in range(200):
        text = random_text(rng, rng.randrange(0, 30)) if rng.random() < 0.5 else "".join(
            rng.choice("abc xyz\n{}") for _ in range(rng.randrange(0, 90)))
        c = rng.choice([1, 2, 4, 7])
        start = rng.randrange(0, len(text) + 1) // c * c
        assert sim_tokens.chunk_ids(text, c, 32_000, 3, start) == [
            sim_tokens.chunk_id(text[i : i + c], 32_000, 3) for i in range(start, len(text), c)]


@pytest.mark.parametrize("chars_per_token", [1, 3, 4, 7])
def test_sim_chats_extending_recent_ones_equal_the_whole_texts_chunks(chars_per_token):
    """A chat taking a recent chat's pieces and ids (re-sent, 0-3 messages added, short pieces whose chunks
    run over several pieces) or one whose history was edited, or holds a tool call (it must not take
    them): always `chunk_ids` of the sim engine's whole render."""
    from kv_wire import sim_tokens

    tokens = SimTokens(chars_per_token=chars_per_token, cache_prompts=8)
    rng = random.Random(100 + chars_per_token)
    sessions = [random_chat(rng, 1) for _ in range(5)]
    for _ in range(200):
        s = rng.randrange(len(sessions))
        msgs = sessions[s]
        pick = rng.random()
        if pick < 0.2 and len(msgs) > 1:
            at = rng.randrange(len(msgs))
            msgs = [*msgs[:at], {"role": "user", "content": "edited"}, *msgs[at + 1 :]]
        elif pick < 0.9:
            for _ in range(rng.randrange(1, 4)):
                content = rng.choice(["", "a", "ok", "→", random_text(rng, rng.randrange(1, 12))])
                msgs = [*msgs, {"role": rng.choice(["user", "assistant"]), "content": content}]
                if rng.random() < 0.05:  # not a simple message: such chats are rendered whole each time
                    msgs[-1] = {**msgs[-1], "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
        sessions[s] = msgs
        text = sim_tokens.render_chat(engine_plain(msgs))
        assert tokens.prompt_ids({"messages": msgs}, "chat") == sim_tokens.chunk_ids(
            text, chars_per_token, sim_tokens.VOCAB_SIZE, 0)
