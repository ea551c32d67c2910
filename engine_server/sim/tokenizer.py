"""A deterministic, prefix-stable tokenizer and output-text generator for the simulated engine.

Text is cut into fixed chunks of `chars_per_token` characters and each chunk hashes to a token id. That
makes tokenization prefix-stable (a shared text prefix gives a shared token prefix up to the last whole
chunk), so the simulated prefix cache hits and misses where a real engine's would, and token counts are a
cheap `ceil(len / chars_per_token)` the router can predict without a model.

Generated text is pseudo-words from a seeded RNG, cut into the same fixed-width chunks: one chunk is one
output token, and re-tokenizing a response yields the very ids that were generated. So a follow-up chat
turn that embeds the response can hit the decode blocks cached while it was generated, as in vLLM.
"""

from __future__ import annotations

import random

import xxhash

from kv_wire.sim_tokens import VOCAB_SIZE as DEFAULT_VOCAB_SIZE
from kv_wire.sim_tokens import chunk_id, chunk_ids

# Lower-case pseudo-words: never contain "<|", newlines or other template markers, so generated text
# cannot accidentally end a chat turn; tests can still pick one of them as a stop string.
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on", "be", "by", "this",
    "are", "or", "from", "at", "an", "model", "cache", "token", "block", "prefix", "router", "engine",
    "batch", "queue", "stream", "latency", "value", "result", "system", "request", "replica", "memory",
    "vector", "layer", "signal", "simple", "rapid", "steady", "bright", "quiet", "north", "river", "stone",
    "paper", "garden", "window", "orange", "silver", "planet", "matter", "number", "little", "common",
)

_SPACED = tuple(" " + w for w in WORDS)


class SimTokenizer:
    """Fixed-width chunk tokenizer: token i is `text[i*c:(i+1)*c]`, its id a hash of that chunk."""

    def __init__(self, chars_per_token: int = 4, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> None:
        if chars_per_token < 1:
            raise ValueError("chars_per_token must be >= 1")
        self.chars_per_token = chars_per_token
        self.vocab_size = vocab_size
        self.seed = seed

    def encode(self, text: str) -> list[int]:
        return chunk_ids(text, self.chars_per_token, self.vocab_size, self.seed)

    def count_tokens(self, text: str) -> int:
        return -(-len(text) // self.chars_per_token)

    def output_stream(self, seed: int) -> OutputStream:
        return OutputStream(self, seed)


class OutputStream:
    """Endless deterministic output: each `next_token()` is one fixed-width chunk of pseudo-words."""

    __slots__ = ("_tok", "_rng", "_buf")

    def __init__(self, tokenizer: SimTokenizer, seed: int) -> None:
        self._tok = tokenizer
        self._rng = random.Random(seed)
        self._buf = ""

    def next_token(self) -> tuple[int, str]:
        c = self._tok.chars_per_token
        while len(self._buf) < c:
            self._buf += _SPACED[int(self._rng.random() * len(_SPACED))]
        text, self._buf = self._buf[:c], self._buf[c:]
        return chunk_id(text, self._tok.vocab_size, self._tok.seed), text


def output_seed(global_seed: int, request_id: str, prompt: str, seed: int | None, temperature: float) -> int:
    """The RNG seed for one request's output.

    An explicit per-request seed wins (same seed, same text, as with vLLM's per-request seed). Greedy
    requests (temperature 0) depend only on the prompt, like argmax decoding. Otherwise the output is
    derived from the engine seed and the request id, so replays with the same ids are identical.
    """
    if seed is not None:
        return seed
    key = f"greedy:{prompt}" if temperature == 0 else f"rid:{request_id}"
    return xxhash.xxh64_intdigest(key.encode("utf-8", "surrogatepass"), global_seed & 0xFFFFFFFFFFFFFFFF)
