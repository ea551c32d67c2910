"""The engine side of the fleet simulator: prompts as the sim engine sees them, and the two engine models.

`ExactEngine` steps the sim engine's own `Scheduler` per token (faithful by construction);
`engine_server.sim.fast.FastEngine` jumps decode windows under the same rules. Both offer one interface
to the event loop (`benchmarks.sim_loop`): ``start(now) -> end``, ``finish(now) -> outputs``,
``arrive(now) -> new end or None``, ``load()``, ``epoch``, ``last_start``. Prompts reach the exact engine
as token ids (`PromptEncoder`) and the fast one as block-hash chains (`ChainEncoder`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from benchmarks.lib.workloads import extend_chain
from engine_server.sim.backend import SimBackend, SimConfig
from engine_server.sim.fast import FastEngine
from engine_server.sim.scheduler import RequestOutput, Scheduler, SchedulerConfig
from engine_server.sim.timing import TimingProfile
from engine_server.sim.tokenizer import DEFAULT_VOCAB_SIZE, SimTokenizer

ENGINES = ("exact", "fast")


class PromptEncoder:
    """Render a chat with the sim engine's template and tokenize it, reusing work for shared prefixes.

    Why: tokenizing is the sim engine's per-request cost (one hash per 4 characters), and workloads
    re-send long shared prefixes (group system prompts, conversation histories). The tokenizer cuts
    fixed 4-character chunks from the start, so the tokens of a message prefix cut at a multiple of 4
    characters never change when more text follows; those are cached (LRU, bounded) per message prefix.
    The result is exactly ``SimTokenizer.encode(SimBackend.render_chat(messages))`` (a test checks it).
    """

    def __init__(self, chars_per_token: int = 4, max_prefixes: int = 4096) -> None:
        self.tokenizer = SimTokenizer(chars_per_token)
        self.render = SimBackend(SimConfig(profile="instant", num_blocks=16,
                                           chars_per_token=chars_per_token)).render_chat
        self.tail = self.render([])  # what the template appends after the last message
        self.c = chars_per_token
        self.max_prefixes = max_prefixes
        self._prefixes: OrderedDict[tuple[tuple[str, str], ...], tuple[list[int], str]] = OrderedDict()
        self._chunks: dict[str, int] = {}

    def _encode(self, text: str) -> list[int]:
        chunks, encode, c = self._chunks, self.tokenizer.encode, self.c
        out = []
        for i in range(0, len(text), c):
            piece = text[i:i + c]
            t = chunks.get(piece)
            if t is None:
                t = chunks[piece] = encode(piece)[0]
                if len(chunks) > 1 << 20:  # bounded: pseudo-word text has few distinct chunks anyway
                    chunks.clear()
            out.append(t)
        return out

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], str]:
        """(prompt token ids, rendered prompt text) as the engine would see them."""
        ids: list[int] = []
        rest = ""
        key: tuple[tuple[str, str], ...] = ()
        texts: list[str] = []
        for k, m in enumerate(messages):
            key = (*key, (str(m.get("role")), str(m.get("content"))))
            cached = self._prefixes.get(key) if k < len(messages) - 1 else None
            part = self.render([m])[: -len(self.tail)] if self.tail else self.render([m])
            texts.append(part)
            if cached is not None:
                self._prefixes.move_to_end(key)
                ids, rest = cached[0].copy(), cached[1]
                continue
            s = rest + part
            cut = len(s) - len(s) % self.c
            ids.extend(self._encode(s[:cut]))
            rest = s[cut:]
            if k < len(messages) - 1:
                self._prefixes[key] = (ids.copy(), rest)
                if len(self._prefixes) > self.max_prefixes:
                    self._prefixes.popitem(last=False)
        ids.extend(self._encode(rest + self.tail))
        return ids, "".join(texts) + self.tail


class ChainEncoder:
    """(prompt tokens, prompt block-hash chain) of a chat as the sim engine would see it, without tokenizing.

    Why: the engine's block ``i`` holds tokens ``[16 i, 16 i + 16)``, i.e. characters ``[64 i, 64 i + 64)``
    of the rendered prompt, so two prompts share block ``i`` exactly when they share those characters and
    everything before (a hash chain). Chains of message prefixes are cached (LRU), so a shared system
    prompt or conversation history is hashed once; whole prompts are cached in a second, smaller LRU, so
    the same workload run under several policies is hashed once, while a million unique questions cannot
    push the shared prefixes out.
    """

    def __init__(self, chars_per_token: int = 4, block_size: int = 16, max_prefixes: int = 1 << 16,
                 max_prompts: int = 8192) -> None:
        self.render = SimBackend(SimConfig(profile="instant", num_blocks=16,
                                           chars_per_token=chars_per_token)).render_chat
        self.tail = self.render([])
        self.c = chars_per_token
        self.block_size = block_size
        self.span = chars_per_token * block_size
        self.limits = (max_prefixes, max_prompts)
        # message prefixes that more messages followed / whole prompts: (chain, rest, characters)
        self._lrus: tuple[OrderedDict[tuple[Any, ...], tuple[list[int], str, int]], ...] = (
            OrderedDict(), OrderedDict())

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[int, list[int]]:
        """Prompt token count and the hashes of its full blocks (a list the caller may keep)."""
        chain: list[int] = []
        rest = ""
        chars = 0
        key: tuple[Any, ...] = ()
        tail_len = len(self.tail)
        last = len(messages) - 1
        for k, m in enumerate(messages):
            calls = m.get("tool_calls")
            key = (*key, (m.get("role"), m.get("content"), repr(calls) if calls else None))
            lru = self._lrus[k == last]
            cached = lru.get(key)
            if cached is not None:
                lru.move_to_end(key)
                chain, rest, chars = cached[0].copy(), cached[1], cached[2]
                continue
            part = self.render([m])
            part = part[:-tail_len] if tail_len else part
            chars += len(part)
            s = rest + part
            full = len(s) - len(s) % self.span
            extend_chain(chain, s, full, self.span)
            rest = s[full:]
            lru[key] = (chain.copy(), rest, chars)
            if len(lru) > self.limits[k == last]:
                lru.popitem(last=False)
        s = rest + self.tail
        tokens = -(-(chars + tail_len) // self.c)
        missing = tokens // self.block_size - len(chain)  # the last block may end in a short chunk
        extend_chain(chain, s, missing * self.span, self.span)
        return tokens, chain


class FastOutput:
    """A cheap stand-in for the engine's `OutputStream`: deterministic ids from the same greedy seed.

    Why: generated text never reaches a metric here (workloads re-send canned answers, not the engine's),
    only its KV blocks do, and those are hashed from token ids that are unique per prompt either way.
    Use ``exact_tokens=True`` to run the engine's own stream instead (about 2 us per token more).
    """

    __slots__ = ("_x",)

    def __init__(self, seed: int) -> None:
        self._x = seed & 0xFFFFFFFFFFFFFFFF

    def next_token(self) -> tuple[int, str]:
        self._x = (self._x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return (self._x >> 33) % DEFAULT_VOCAB_SIZE, ""


class ExactEngine:
    """The real `Scheduler` behind the interface `FastEngine` offers: one segment is one `step()`.

    Why: one event loop drives either engine model; this one steps per token (faithful by construction),
    the fast one jumps decode windows (`engine_server.sim.fast`).
    """

    def __init__(self, config: SchedulerConfig, timing: TimingProfile) -> None:
        self.sched = Scheduler(config, timing)
        self.last_start = 0.0  # when the step under way started (the fast engine's window has its own)
        self.num_blocks = config.num_blocks
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.epoch = 0
        self._outputs: list[RequestOutput] = []

    @property
    def has_work(self) -> bool:
        return self.sched.has_work

    @property
    def steps(self) -> int:
        return self.sched.stats.steps

    @property
    def preemptions(self) -> int:
        return self.sched.stats.preemptions

    def load(self) -> tuple[int, int, int]:
        s = self.sched
        return s.num_running, s.num_waiting, s.kv.num_used_blocks

    def start(self, now: float) -> float:
        """Run the step now (blocks allocated and published as in the engine loop); return its end."""
        self.epoch += 1
        self.last_start = now
        result = self.sched.step()
        self._outputs = result.outputs
        return now + result.duration_s

    def finish(self, now: float) -> list[RequestOutput]:
        return self._outputs

    def arrive(self, now: float) -> float | None:
        return None  # a request arriving mid-step waits for the next step


def make_engine(kind: str, config: SchedulerConfig, timing: TimingProfile, keep_itl: bool = True
                ) -> ExactEngine | FastEngine:
    if kind == "fast":
        return FastEngine(config, timing, keep_itl)
    if kind == "exact":
        return ExactEngine(config, timing)
    raise ValueError(f"unknown engine {kind!r}; choose from {', '.join(ENGINES)}")


_CHAINS: dict[int, ChainEncoder] = {}


def shared_chain_encoder() -> ChainEncoder:
    """One `ChainEncoder` per process, so runs of several policies over one workload hash it once."""
    return _CHAINS.setdefault(0, ChainEncoder())
