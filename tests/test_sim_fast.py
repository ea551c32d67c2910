"""The fast engine model (engine_server.sim.fast) against the stepped `Scheduler`, request by request.

Both engines get the same requests at the same (virtual) times; every request must get its first token
and finish at exactly the same model time, with the same cached and generated token counts, and both
must run the same number of steps. Exact equality, not statistics: the fast model only skips the
per-token bookkeeping of decode windows. The scope is the fast model's exact regime (docs/simulator.md):
a profile without KV-usage slowdown and no preemption.
"""

from __future__ import annotations

import random

import pytest

from engine_server.backend import BackendError, PromptTooLong
from engine_server.sim.fast import FastEngine
from engine_server.sim.kv_cache import block_hashes
from engine_server.sim.scheduler import Scheduler, SchedulerConfig, SimRequest
from engine_server.sim.timing import TimingProfile
from engine_server.sim.tokenizer import SimTokenizer

PROFILE = TimingProfile("test", "", step_overhead_s=0.010, prefill_overhead_s=0.003, prefill_per_token_s=0.001,
                        decode_overhead_s=0.002, decode_per_seq_s=0.0001)
BS = 16
Arrival = tuple[float, str, list[int], int]  # time, request id, prompt ids, max tokens
Outcomes = dict[str, tuple[float, float, int, int]]  # id -> first token at, finished at, cached, generated


def config(num_blocks: int = 512, max_num_seqs: int = 4, budget: int = 96) -> SchedulerConfig:
    return SchedulerConfig(num_blocks, max_num_seqs, budget, 4096, BS)


def run_exact(cfg: SchedulerConfig, arrivals: list[Arrival]) -> tuple[Outcomes, int]:
    """The engine loop: a step starts when the previous ends (or at an arrival when idle); requests that
    arrive during a step join at the next one."""
    sched, tok = Scheduler(cfg, PROFILE), SimTokenizer()
    pending = sorted(arrivals)
    first: dict[str, float] = {}
    out: Outcomes = {}
    t = 0.0
    while pending or sched.has_work:
        if not sched.has_work:
            t = max(t, pending[0][0])
        while pending and pending[0][0] <= t:
            _, rid, ids, max_tokens = pending.pop(0)
            sched.add(SimRequest(rid, ids, max_tokens, tok.output_stream(hash(rid) & 0xFFFF)))
        step = sched.step()
        t += step.duration_s
        for o in step.outputs:
            if o.first:
                first[o.request_id] = t
            if o.finish_reason:
                out[o.request_id] = (first[o.request_id], t, o.cached_tokens, o.completion_tokens)
    return out, sched.stats.steps


SEGMENTS: list[int] = []  # run_fast's segments and window cuts, to check the windows were exercised
CUTS: list[int] = []


def run_fast(cfg: SchedulerConfig, arrivals: list[Arrival]) -> tuple[Outcomes, int]:
    """The simulator's event loop in miniature: segments end at ``start``'s answer unless an arrival
    cuts a decode window short (``arrive``)."""
    SEGMENTS.append(0)
    CUTS.append(0)
    eng = FastEngine(cfg, PROFILE)
    pending = sorted(arrivals)
    first: dict[str, float] = {}
    out: Outcomes = {}
    end: float | None = None
    while pending or end is not None:
        if end is None:
            at = pending[0][0]
            while pending and pending[0][0] <= at:
                _, rid, ids, max_tokens = pending.pop(0)
                eng.add(rid, len(ids), block_hashes(ids, BS), max_tokens)
            end = eng.start(at)
            continue
        if pending and pending[0][0] < end:
            at, rid, ids, max_tokens = pending.pop(0)
            eng.add(rid, len(ids), block_hashes(ids, BS), max_tokens)
            cut = eng.arrive(at)
            CUTS[-1] += cut is not None
            end = cut or end
            continue
        SEGMENTS[-1] += 1
        for e in eng.finish(end):
            if e.first:
                first[e.request_id] = end
            if e.finish_reason:
                out[e.request_id] = (first[e.request_id], end, e.cached_tokens, e.completion_tokens)
        end = eng.start(end) if eng.has_work else None
    return out, eng.steps


def shared_prefix_requests(n: int, seed: int, spread_s: float) -> list[Arrival]:
    """Groups sharing a multi-block system prefix, unique questions, uneven output lengths."""
    rng = random.Random(seed)
    systems = [[1000 * g + i for i in range(rng.randrange(20, 90))] for g in range(3)]
    return [(rng.uniform(0.0, spread_s), f"q{i}",
             rng.choice(systems) + [10**6 + 100 * i + j for j in range(rng.randrange(1, 40))],
             rng.randrange(1, 24))
            for i in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("spread_s", [0.0, 0.5, 3.0])
def test_fast_engine_matches_the_scheduler_request_by_request(seed: int, spread_s: float) -> None:
    arrivals = shared_prefix_requests(40, seed, spread_s)
    exact, exact_steps = run_exact(config(), arrivals)
    fast, fast_steps = run_fast(config(), arrivals)
    assert len(exact) == len(arrivals)
    assert fast == exact
    assert fast_steps == exact_steps
    assert any(cached for _, _, cached, _ in exact.values())  # the prefix cache was exercised
    assert SEGMENTS[-1] < 0.75 * fast_steps  # decode windows were jumped, not stepped
    if spread_s == 3.0:
        assert CUTS[-1] > 0  # and arrivals cut some short


def test_fast_engine_matches_with_a_cache_that_evicts() -> None:
    """A pool just big enough for the batch: finished prompts are evicted LRU, tail block first."""
    arrivals = shared_prefix_requests(30, 7, 2.0)
    cfg = config(num_blocks=24, max_num_seqs=2)
    exact, exact_steps = run_exact(cfg, arrivals)
    assert run_fast(cfg, arrivals) == (exact, exact_steps)
    assert len(exact) == len(arrivals)
    ample, _ = run_exact(config(max_num_seqs=2), arrivals)
    assert sum(c for *_, c, _ in exact.values()) < sum(c for *_, c, _ in ample.values())  # evictions cost hits


@pytest.mark.parametrize(("prompt", "max_tokens", "error"), [
    (0, 4, BackendError), (8, 0, BackendError), (4000, 200, PromptTooLong)])
def test_both_engines_refuse_the_same_requests_with_the_same_message(prompt: int, max_tokens: int,
                                                                    error: type[Exception]) -> None:
    with pytest.raises(error) as exact:
        Scheduler(config(), PROFILE).add(SimRequest("r", list(range(prompt)), max_tokens, SimTokenizer().output_stream(0)))
    with pytest.raises(error) as fast:
        FastEngine(config(), PROFILE).add("r", prompt, [], max_tokens)
    assert str(fast.value) == str(exact.value)
