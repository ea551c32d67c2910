"""`ByteLevelWords`: word-by-word byte-level BPE gives the Rust tokenizer's ids exactly, or None."""

from __future__ import annotations

import json
import random

import pytest

from router.features.bytelevel import ByteLevelWords

pytest.importorskip("transformers")

# ASCII the fast path takes (printable, newline, tab) and characters it leaves to the tokenizer
PRINTABLE = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t"]
OTHER = ["é", "→", "ü", "\r", "\x0b", "\x00", "\u00a0", "漢", "🙂"]
PIECES = ["the", " the", "  ", "   ", "'s", "'ll", "'t", "n't", "123", " 4567", "...", "!?", "\n\n", "\t", " x "]


@pytest.fixture(scope="module")
def backend():
    from engine_server.tiny_model import build_tokenizer

    return build_tokenizer().backend_tokenizer


@pytest.fixture(scope="module")
def words(backend) -> ByteLevelWords:
    got = ByteLevelWords.for_tokenizer(backend)
    assert got is not None  # the tiny model's tokenizer is GPT-2 style
    return got


def rust_ids(backend, text: str) -> list[int]:
    return backend.encode(text, add_special_tokens=False).ids


def test_random_ascii_text_encodes_as_the_rust_tokenizer(words, backend):
    rng = random.Random(14)
    for _ in range(400):
        text = "".join(rng.choice(PIECES) if rng.random() < 0.5 else rng.choice(PRINTABLE)
                       for _ in range(rng.randrange(0, 80)))
        assert words.encode(text) == rust_ids(backend, text), repr(text)


def test_words_seen_before_give_the_same_ids_from_the_cache(words, backend):
    text = "cache the router's blocks: 12 of 345, again and again\n"
    first = words.encode(text)
    assert words.encode(text) == first == rust_ids(backend, text)


def test_text_outside_printable_ascii_is_left_to_the_tokenizer(words):
    rng = random.Random(3)
    for ch in OTHER:
        assert words.encode(f"plain {ch} text") is None
        assert words.encode("".join(rng.choice(PRINTABLE) for _ in range(20)) + ch) is None


def test_other_pipelines_are_refused(backend):
    class Edited:
        def __init__(self, edit):
            config = json.loads(backend.to_str())
            edit(config)
            self.text, self.model = json.dumps(config), backend.model

        def to_str(self):
            return self.text

    def prefix_space(c):
        c["pre_tokenizer"]["add_prefix_space"] = True

    def normalizer(c):
        c["normalizer"] = {"type": "NFC"}

    def metaspace(c):
        c["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}

    for edit in (prefix_space, normalizer, metaspace):
        assert ByteLevelWords.for_tokenizer(Edited(edit)) is None


def test_a_bounded_cache_forgets_and_still_answers(backend):
    small = ByteLevelWords(backend.model, max_words=4)
    text = "one two three four five six seven eight nine ten"
    assert small.encode(text) == small.encode(text) == rust_ids(backend, text)
    assert len(small._words) <= 4
