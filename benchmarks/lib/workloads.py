"""Seeded benchmark workloads: what is sent, in which sessions, independent of who routes it.

A workload is a list of sessions; a session is a list of chat requests that must run one after another
(the turns of a conversation, the steps of an agent). Single-request sessions model independent
requests. Every request is fixed in advance, including the assistant answers that later turns re-send
(canned text of the requested output length), so every contender, the live fleet and the offline
simulator see byte-identical prompts and their hit rates are comparable.

Lengths are in sim-engine tokens (4 characters each, `engine_server.sim.tokenizer`); defaults are scaled
for a 2-core machine, ``full=True`` gives the literature's sizes (see `../shared/reference.md`). The
defaults keep cold first requests (a group's first question, a conversation's first turn) under 10 %
of the requests, so a TTFT p90 measures routing and queueing rather than unavoidable cold prefills.

- ``gsp``: generated shared prefix: G groups x Q questions on a group system prompt, shuffled.
- ``multiturn``: C conversations x T turns, every turn re-sends the whole history; all conversations
  share one system prompt (about a third of the first turn, the shape that pins naive prefix routers).
- ``agentic``: A agent types with long tool/system prefixes, picked with Zipf popularity; sessions grow
  by a tool call and a tool output per step.
- ``prefix-sweep``: requests whose shared prefix is ``ratio`` of the prompt (P prefixes), 0.1..0.9.
- ``trace``: a Mooncake-style JSONL trace (timestamp ms, input_length, output_length, hash_ids of
  ``block_tokens``-token blocks); equal hash ids become equal text, so the trace's sharing is kept.
"""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

CHARS_PER_TOKEN = 4  # the sim engine's tokenizer: one token per 4 characters
ENGINE_BLOCK_TOKENS = 16  # the sim engine's (and vLLM's default) KV block size
TRACE_DIR = Path(__file__).resolve().parents[1] / "traces"
WORDS = ("alpha", "bravo", "cache", "delta", "engine", "fleet", "gamma", "hotel", "index", "joule", "kappa",
         "lemma", "metric", "node", "omega", "prefix", "query", "route", "sigma", "token", "umbra", "vector",
         "window", "xenon", "yield", "zeta")

Message = dict[str, str]


def text_of(rng: random.Random, tokens: int) -> str:
    """Pseudo-words of exactly ``tokens`` sim tokens (``tokens`` x 4 characters)."""
    chars = tokens * CHARS_PER_TOKEN
    parts: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS) + " "
        parts.append(w)
        n += len(w)
    return "".join(parts)[:chars]


@dataclass(frozen=True)
class Request:
    """One chat completion: the full message list sent and how many tokens to generate."""

    messages: tuple[Message, ...]
    max_tokens: int

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI request body; ``ignore_eos`` makes every engine generate exactly ``max_tokens``."""
        return {"model": model, "messages": list(self.messages), "max_tokens": self.max_tokens,
                "temperature": 0.0, "ignore_eos": True}


@dataclass(frozen=True)
class Session:
    """Requests that run one after another; ``at_s`` fixes the arrival time (trace replay)."""

    id: str
    turns: tuple[Request, ...]
    group: str = ""  # what it shares a prefix with (group, agent type), for diagnostics
    at_s: float | None = None


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[Session, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def requests(self) -> Iterator[Request]:
        """Every request in canonical order: sessions in order, turns in order."""
        for s in self.sessions:
            yield from s.turns

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "seed")
        return f"{self.name}: {len(self.sessions)} sessions, {self.num_requests} requests ({p})"


# -- generators ------------------------------------------------------------------------------------


def gsp(groups: int = 16, questions: int = 16, system_tokens: int = 512, question_tokens: int = 64,
        output_tokens: int = 32, *, seed: int = 0, full: bool = False) -> Workload:
    """Generated shared prefix: ``groups`` system prompts, ``questions`` each, sent in shuffled order."""
    if full:
        groups, questions, system_tokens, question_tokens, output_tokens = 64, 16, 2048, 128, 256
    rng = random.Random(seed)
    systems = [f"Group {g}. " + text_of(rng, system_tokens) for g in range(groups)]
    order = [(g, q) for g in range(groups) for q in range(questions)]
    rng.shuffle(order)
    sessions = tuple(
        Session(id=f"g{g}q{q}", group=f"g{g}", turns=(Request(
            ({"role": "system", "content": systems[g]},
             {"role": "user", "content": f"Question {q}: " + text_of(rng, question_tokens)}),
            output_tokens),))
        for g, q in order)
    return Workload("gsp", sessions, {"groups": groups, "questions": questions, "system_tokens": system_tokens,
                                      "question_tokens": question_tokens, "output_tokens": output_tokens,
                                      "seed": seed})


def multiturn(conversations: int = 16, turns: int = 12, system_tokens: int = 200, first_user_tokens: int = 400,
              user_tokens: int = 64, output_tokens: int = 32, *, seed: int = 0, full: bool = False) -> Workload:
    """Chats re-sending their history each turn; one system prompt shared by all conversations."""
    if full:
        conversations, turns, system_tokens, first_user_tokens, user_tokens, output_tokens = 24, 12, 1000, 2000, \
            128, 256
    rng = random.Random(seed)
    system = {"role": "system", "content": "You are a helpful assistant. " + text_of(rng, system_tokens)}
    sessions = []
    for c in range(conversations):
        history: list[Message] = [system]
        reqs = []
        for t in range(turns):
            n = first_user_tokens if t == 0 else user_tokens
            history.append({"role": "user", "content": f"Conversation {c} turn {t}: " + text_of(rng, n)})
            reqs.append(Request(tuple(history), output_tokens))
            history.append({"role": "assistant", "content": text_of(rng, output_tokens)})
        sessions.append(Session(id=f"c{c}", group="shared-system", turns=tuple(reqs)))
    return Workload("multiturn", tuple(sessions), {
        "conversations": conversations, "turns": turns, "system_tokens": system_tokens,
        "first_user_tokens": first_user_tokens, "user_tokens": user_tokens, "output_tokens": output_tokens,
        "seed": seed})


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of rank 1..n under Zipf's law with exponent ``s``, normalised to sum to 1."""
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def agentic(sessions: int = 24, steps: int = 4, agents: int = 6, prefix_tokens: int = 1024, task_tokens: int = 64,
            tool_output_tokens: int = 128, output_tokens: int = 24, zipf_s: float = 1.1, *, seed: int = 0,
            full: bool = False) -> Workload:
    """Agent sessions: a long per-agent tool/system prefix (Zipf-popular), growing by tool outputs."""
    if full:
        sessions, steps, agents, prefix_tokens, task_tokens, tool_output_tokens, output_tokens = \
            200, 8, 20, 4096, 256, 512, 128
    rng = random.Random(seed)
    prefixes = [f"Agent {a} tools and instructions. " + text_of(rng, prefix_tokens) for a in range(agents)]
    weights = zipf_weights(agents, zipf_s)
    out = []
    for s in range(sessions):
        a = rng.choices(range(agents), weights)[0]
        history: list[Message] = [{"role": "system", "content": prefixes[a]},
                                  {"role": "user", "content": f"Task {s}: " + text_of(rng, task_tokens)}]
        reqs = []
        for k in range(steps):
            reqs.append(Request(tuple(history), output_tokens))
            history.append({"role": "assistant", "content": f"call tool {k}: " + text_of(rng, output_tokens)})
            history.append({"role": "user", "content": f"Tool output {k}: " + text_of(rng, tool_output_tokens)})
        out.append(Session(id=f"s{s}", group=f"agent{a}", turns=tuple(reqs)))
    return Workload("agentic", tuple(out), {
        "sessions": sessions, "steps": steps, "agents": agents, "prefix_tokens": prefix_tokens,
        "task_tokens": task_tokens, "tool_output_tokens": tool_output_tokens, "output_tokens": output_tokens,
        "zipf_s": zipf_s, "seed": seed})


def prefix_sweep(ratio: float = 0.5, requests: int = 96, prefixes: int = 8, prompt_tokens: int = 1024,
                 output_tokens: int = 32, *, seed: int = 0, full: bool = False) -> Workload:
    """Independent requests whose first ``ratio`` of the prompt is one of ``prefixes`` shared texts."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be within 0..1, got {ratio}")
    if full:
        requests, prefixes, prompt_tokens, output_tokens = 512, 16, 4096, 256
    rng = random.Random(seed)
    shared = round(prompt_tokens * ratio)
    texts = [text_of(rng, shared) for _ in range(prefixes)]
    sessions = []
    for i in range(requests):
        p = rng.randrange(prefixes)
        content = texts[p] + text_of(rng, prompt_tokens - shared)
        sessions.append(Session(id=f"r{i}", group=f"p{p}",
                                turns=(Request(({"role": "user", "content": content},), output_tokens),)))
    return Workload(f"prefix-sweep-{ratio:g}", tuple(sessions), {
        "ratio": ratio, "requests": requests, "prefixes": prefixes, "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "seed": seed})


SWEEP_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def trace(path: Path | str, block_tokens: int = 512, *, limit: int | None = None, time_scale: float = 1.0,
          max_input_tokens: int | None = None, seed: int = 0) -> Workload:
    """Replay a Mooncake-style JSONL trace; ``time_scale`` > 1 stretches arrivals (lower load)."""
    rows = []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((float(row["timestamp"]), int(row["input_length"]), int(row["output_length"]),
                             [int(h) for h in row.get("hash_ids", [])]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a trace row ({exc.__class__.__name__}: {exc})") from exc
            if limit is not None and len(rows) >= limit:
                break
    t0 = min((r[0] for r in rows), default=0.0)
    sessions = []
    for i, (ts, n_in, n_out, hash_ids) in enumerate(rows):
        if max_input_tokens is not None:
            n_in = min(n_in, max_input_tokens)
        text = "".join(_trace_block(h, block_tokens, seed) for h in hash_ids)[: n_in * CHARS_PER_TOKEN]
        if len(text) < n_in * CHARS_PER_TOKEN:
            text += text_of(random.Random(f"{seed}:{i}"), n_in - len(text) // CHARS_PER_TOKEN)
        sessions.append(Session(id=f"t{i}", group=f"h{hash_ids[0]}" if hash_ids else "",
                                at_s=(ts - t0) / 1000.0 * time_scale,
                                turns=(Request(({"role": "user", "content": text},), max(1, n_out)),)))
    return Workload(f"trace-{Path(path).stem}", tuple(sessions), {
        "path": str(path), "block_tokens": block_tokens, "rows": len(rows), "time_scale": time_scale, "seed": seed})


def _trace_block(hash_id: int, block_tokens: int, seed: int) -> str:
    return text_of(random.Random(f"{seed}/{hash_id}"), block_tokens)


def synth_trace(path: Path, rows: int = 200, rate_per_s: float = 4.0, block_tokens: int = 64,
                docs: int = 12, seed: int = 0) -> Path:
    """Write a small Mooncake-format trace: Zipf-popular shared documents plus private blocks."""
    rng = random.Random(seed)
    weights = zipf_weights(docs, 1.0)
    doc_blocks = [[d * 100 + k for k in range(rng.randint(4, 12))] for d in range(docs)]
    next_private = 100_000
    t = 0.0
    lines = []
    for _ in range(rows):
        t += rng.expovariate(rate_per_s) * 1000.0
        d = rng.choices(range(docs), weights)[0]
        private = rng.randint(1, 3)
        ids = doc_blocks[d] + list(range(next_private, next_private + private))
        next_private += private
        n_in = (len(ids) - 1) * block_tokens + rng.randint(1, block_tokens)
        lines.append(json.dumps({"timestamp": int(t), "input_length": n_in, "output_length": rng.randint(8, 48),
                                 "hash_ids": ids}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


SAMPLE_TRACE = TRACE_DIR / "sample.jsonl"  # synth_trace(SAMPLE_TRACE) with the defaults; block_tokens=64


# -- by name ---------------------------------------------------------------------------------------


NAMES = ("gsp", "multiturn", "agentic", "prefix-sweep", "trace")
GENERATORS: dict[str, Callable[..., Workload]] = {"gsp": gsp, "multiturn": multiturn, "agentic": agentic,
                                                  "prefix-sweep": prefix_sweep, "trace": trace}


def reseed(workload: Workload, seed: int) -> Workload:
    """The same workload shape with other text: for replicas whose caches cannot be reset between runs."""
    p = {k: v for k, v in workload.params.items() if k != "seed"}
    if workload.name.startswith("trace-"):
        return trace(p["path"], p["block_tokens"], limit=p["rows"], time_scale=p["time_scale"], seed=seed)
    generator = GENERATORS["prefix-sweep" if workload.name.startswith("prefix-sweep") else workload.name]
    return generator(**p, seed=seed)


def build(name: str, *, seed: int = 0, full: bool = False, trace_path: Path | None = None,
          **overrides: Any) -> list[Workload]:
    """Workloads by command-line name; ``prefix-sweep`` expands to one workload per ratio."""
    if name == "gsp":
        return [gsp(seed=seed, full=full, **overrides)]
    if name == "multiturn":
        return [multiturn(seed=seed, full=full, **overrides)]
    if name == "agentic":
        return [agentic(seed=seed, full=full, **overrides)]
    if name == "prefix-sweep":
        ratios = overrides.pop("ratios", SWEEP_RATIOS)
        return [prefix_sweep(r, seed=seed, full=full, **overrides) for r in ratios]
    if name == "trace":
        path = trace_path or SAMPLE_TRACE
        block = overrides.pop("block_tokens", 64 if path == SAMPLE_TRACE else 512)
        return [trace(path, block, seed=seed, **overrides)]
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}")


# -- what a perfect fleet could cache ------------------------------------------------------------------


Render = Callable[[Sequence[Message]], str]


def sim_render() -> Render:
    """The sim engine's chat template (what the engine tokenizes and caches)."""
    from engine_server.sim.backend import SimBackend, SimConfig

    return SimBackend(SimConfig(profile="instant", num_blocks=16)).render_chat


def prompt_block_hashes(request: Request, render: Render, block_tokens: int = ENGINE_BLOCK_TOKENS) -> tuple[
        int, list[int]]:
    """(prompt tokens, chained hashes of the prompt's full blocks) as the sim engine would see them."""
    text = render(request.messages)
    n_tokens = math.ceil(len(text) / CHARS_PER_TOKEN)
    hashes: list[int] = []
    span = block_tokens * CHARS_PER_TOKEN
    extend_chain(hashes, text, n_tokens // block_tokens * span, span)
    return n_tokens, hashes


def extend_chain(chain: list[int], text: str, stop: int, span: int) -> None:
    """Append the chained hashes of ``text[0:stop]`` cut into ``span``-character blocks to ``chain``.

    A sim token is a fixed 4-character chunk, so engine block ``i`` is exactly characters
    ``[i * span, (i + 1) * span)``: two prompts share a block hash iff they share that text and all
    before it, as the engine's chain over token ids does. The oracle and the simulator's fast engine
    both hash with this, so their hits agree by construction.
    """
    parent = chain[-1] if chain else 0
    for j in range(0, stop, span):
        parent = xxhash.xxh64_intdigest(text[j:j + span].encode(), parent)
        chain.append(parent)


@dataclass(frozen=True)
class CacheBound:
    """Hit rate of one pooled prefix cache with the whole fleet's capacity (the oracle placement)."""

    hit_rate: float
    prompt_tokens: int
    cached_tokens: int
    unique_blocks: int  # distinct full prompt blocks in the workload (its cache footprint)
    capacity_blocks: int


def oracle(workload: Workload, capacity_blocks: int, render: Render | None = None,
           block_tokens: int = ENGINE_BLOCK_TOKENS) -> CacheBound:
    """The hit rate if the fleet's KV capacity were one LRU prefix cache, requests in canonical order.

    Any placement on N replicas of C blocks each holds at most N x C blocks, and a request hits only
    blocks already computed somewhere; pooling removes every routing mistake (duplicated prefixes,
    split groups), so this is the best a router could reach for the same cache capacity. As in vLLM a
    hit needs the whole chain from the first block and never covers the prompt's last token.
    """
    render = render or sim_render()
    cache: OrderedDict[int, None] = OrderedDict()
    seen: set[int] = set()
    prompt = cached = 0
    for req in workload.requests():
        n_tokens, hashes = prompt_block_hashes(req, render, block_tokens)
        hit = 0
        for h in hashes:
            if h not in cache:
                break
            hit += 1
        hit = min(hit, (n_tokens - 1) // block_tokens)
        prompt += n_tokens
        cached += hit * block_tokens
        for h in hashes:
            seen.add(h)
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return CacheBound(cached / prompt if prompt else math.nan, prompt, cached, len(seen), capacity_blocks)


def footprint_blocks(workload: Workload, render: Render | None = None,
                     block_tokens: int = ENGINE_BLOCK_TOKENS) -> int:
    """Distinct full prompt blocks the workload touches (plus nothing for outputs)."""
    return oracle(workload, 1 << 62, render, block_tokens).unique_blocks


def kv_blocks_per_replica(workload: Workload, replicas: int, capacity_factor: float = 1.3,
                          render: Render | None = None) -> int:
    """Per-replica KV blocks so the fleet holds ``capacity_factor`` x the workload's footprint.

    With a factor a little above 1 a partitioned placement keeps every prefix while replicating all
    of them on every replica does not fit: the regime where routing decides the hit rate.
    """
    need = footprint_blocks(workload, render) * capacity_factor / replicas
    return max(64, math.ceil(need / 16) * 16)
