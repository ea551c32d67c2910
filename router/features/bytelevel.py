"""Byte-level BPE word by word, each word's ids cached: a chat turn's new text without the Rust call.

Why: a GPT-2-style tokenizer (``ByteLevel`` pre-tokenizer with its regex, a BPE model) spends most of an
encode call in the pre-tokenizer's regex and the call's overhead (~80 us of thread CPU for a 30-word
message, ~0.17 ms of a warm chat turn's ~0.2 ms encode), while a chat's words repeat. The tokenizer's
pipeline is: split the text with the GPT-2 regex, map each word's bytes to the byte-level alphabet, run the
BPE model on each word alone. Here the split is Python's `regex` (the same pattern), and a word's ids are
the model's own answer for it (``model.tokenize``), kept in a dict, so a text is one ``findall`` and a
lookup per word.

Used only where that pipeline is exactly the tokenizer's: no normalizer, ``ByteLevel(add_prefix_space=False,
use_regex=True)`` as the whole pre-tokenizer, a BPE model without dropout; and only for text of printable
ASCII, newline and tab, where the Rust and Python regex engines agree on ``\\s``, ``\\p{L}`` and ``\\p{N}``
(other text returns None: the caller asks the tokenizer). `for_tokenizer` also compares both ways on a
sample before it says yes. ``tests/router/test_bytelevel_words.py`` compares them on random text.
"""

from __future__ import annotations

import json
import re
from typing import Any

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_OTHER = re.compile(r"[^\x20-\x7e\n\t]")  # outside what both regex engines surely read alike

SAMPLE = ("Hello there,  how's it going?\n\nA list: 1, 22, 333 and 4444.\tTabs\t\tand   spaces   \n"
          "it'll be they're we've I'm you'd 'quoted' \"double\" (parens) [x]{y} a+b=c; <tag/> ~`!@#$%^&*_-|\\\n"
          "  leading and trailing  \n\n\n end")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet the vocabulary is written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ByteLevelWords:
    """``encode(text)``: the tokenizer's ids for ``text`` (no special tokens), or None for text it leaves
    to the tokenizer. Built by `for_tokenizer`, which checks that it applies."""

    def __init__(self, model: Any, *, max_words: int = 1 << 18) -> None:
        import regex  # transformers' own dependency: present wherever a HF tokenizer is

        self._model = model
        self._split = regex.compile(GPT2_PATTERN).findall
        self._alphabet = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items() if b < 128})
        self._words: dict[str, list[int]] = {}
        self.max_words = max_words

    @classmethod
    def for_tokenizer(cls, backend: Any) -> ByteLevelWords | None:
        """For a `tokenizers.Tokenizer` whose pipeline is the one above, else None (also when the sample
        does not encode alike both ways)."""
        try:
            config = json.loads(backend.to_str())
            pre, model = config.get("pre_tokenizer") or {}, config.get("model") or {}
            if (config.get("normalizer") is not None or pre.get("type") != "ByteLevel"
                    or pre.get("add_prefix_space") or not pre.get("use_regex", True)
                    or model.get("type") != "BPE" or model.get("dropout")):
                return None
            words = cls(backend.model)
            texts = [SAMPLE, *SAMPLE.split("\n"), " ", "  ", "\n", "x"]
            if all(words.encode(t) == backend.encode(t, add_special_tokens=False).ids for t in texts):
                words._words.clear()
                return words
        except Exception:  # noqa: BLE001 - anything unexpected: the tokenizer encodes as before
            return None
        return None

    def encode(self, text: str) -> list[int] | None:
        if not text.isascii() or _OTHER.search(text):
            return None
        words, ids = self._words, []
        for word in self._split(text):
            got = words.get(word)
            if got is None:
                got = [t.id for t in self._model.tokenize(word.translate(self._alphabet))]
                if len(words) >= self.max_words:
                    words.clear()  # a bound on memory: forgetting costs time only
                words[word] = got
            ids.extend(got)
        return ids
