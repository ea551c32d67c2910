"""Specification of the pure scheduler core, run in virtual (model) time."""

from __future__ import annotations

import pytest

from engine_server.backend import BackendError, PromptTooLong
from engine_server.sim.scheduler import RequestOutput, Scheduler, SchedulerConfig, SimRequest, StepResult
from engine_server.sim.timing import TimingProfile
from engine_server.sim.tokenizer import SimTokenizer

TOK = SimTokenizer()
# Easy numbers: 10 ms per step, 1 ms per prefill token, 0.1 ms per decoding sequence.
PROFILE = TimingProfile("test", "", step_overhead_s=0.010, prefill_per_token_s=0.001, decode_per_seq_s=0.0001)


def make(num_blocks: int = 256, max_num_seqs: int = 8, budget: int = 512, max_model_len: int = 4096,
         profile: TimingProfile = PROFILE) -> Scheduler:
    return Scheduler(SchedulerConfig(num_blocks, max_num_seqs, budget, max_model_len), profile)


def req(rid: str, prompt: list[int], max_tokens: int = 4, seed: int = 0, stop: tuple[str, ...] = ()) -> SimRequest:
    return SimRequest(rid, prompt, max_tokens, TOK.output_stream(seed), stop)


def toks(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def run(s: Scheduler) -> tuple[list[StepResult], dict[str, list[RequestOutput]], dict[str, float]]:
    """Run to idle; return steps, outputs per request and each request's model-time first-token latency."""
    steps: list[StepResult] = []
    outs: dict[str, list[RequestOutput]] = {}
    ttft: dict[str, float] = {}
    clock = 0.0
    while s.has_work:
        r = s.step()
        clock += r.duration_s
        steps.append(r)
        for o in r.outputs:
            outs.setdefault(o.request_id, []).append(o)
            if o.first:
                ttft[o.request_id] = clock
    return steps, outs, ttft


# --------------------------------------------------------------------------------------- prefix cache


def test_repeated_prefix_reports_cached_full_blocks() -> None:
    s = make()
    s.add(req("a", toks(100)))
    run(s)
    s.add(req("b", toks(100)))
    s.add(req("c", toks(40) + toks(60, base=5000)))
    _, outs, _ = run(s)
    assert outs["b"][0].cached_tokens == 96  # 6 full blocks; the partial 7th is recomputed
    assert outs["c"][0].cached_tokens == 32  # 40 shared tokens = 2 full blocks
    assert all(o.prompt_tokens == 100 for o in outs["b"])


def test_fully_cached_prompt_still_recomputes_its_last_token() -> None:
    s = make()
    s.add(req("a", toks(64)))
    run(s)
    s.add(req("b", toks(64)))
    steps, outs, _ = run(s)
    assert outs["b"][0].cached_tokens == 48  # capped at 63 tokens -> 3 whole blocks
    assert steps[0].prefill_tokens == 16


def test_blocks_are_shared_with_a_request_admitted_in_the_same_step() -> None:
    s = make()
    s.add(req("a", toks(100)))
    s.add(req("b", toks(100)))  # e.g. the second choice of an n=2 request
    steps, outs, _ = run(s)
    assert outs["b"][0].cached_tokens == 96
    assert steps[0].prefill_tokens == 100 + 4


def test_prefix_cache_counters_match_the_reported_tokens() -> None:
    s = make()
    for rid in ("a", "b"):
        s.add(req(rid, toks(100)))
        run(s)
    assert (s.kv.stats.queries, s.kv.stats.hits) == (200, 96)


def test_generated_blocks_are_cached_for_the_next_turn() -> None:
    """A follow-up prompt embedding the response hits the decode blocks too (vLLM caches them)."""
    s = make()
    prompt = "x" * 128  # 32 tokens, a multiple of chars_per_token
    s.add(req("t1", TOK.encode(prompt), max_tokens=40))
    _, outs, _ = run(s)
    answer = "".join(o.text for o in outs["t1"])
    follow_up = TOK.encode(prompt + answer + "and then?")
    s.add(req("t2", follow_up))
    _, outs, _ = run(s)
    assert outs["t2"][0].cached_tokens == 64  # 72 known tokens, 71 written back -> 4 full blocks


def test_eviction_under_a_full_cache_bounds_usage() -> None:
    s = make(num_blocks=16)
    for i in range(6):
        s.add(req(f"r{i}", toks(64, base=1000 * i), max_tokens=2))
        steps, _, _ = run(s)
        assert all(0.0 <= r.kv_usage <= 1.0 for r in steps)
    assert s.kv.stats.evictions > 0
    s.add(req("again", toks(64)))  # r0's blocks were reused for later prompts
    _, outs, _ = run(s)
    assert outs["again"][0].cached_tokens == 0


# ------------------------------------------------------------------------------------ batching limits


def test_max_num_seqs_is_respected() -> None:
    s = make(max_num_seqs=3)
    for i in range(7):
        s.add(req(f"r{i}", toks(20, base=100 * i), max_tokens=5))
    while s.has_work:
        s.step()
        assert s.num_running <= 3


def test_token_budget_is_respected() -> None:
    s = make(budget=64)
    for i in range(5):
        s.add(req(f"r{i}", toks(50, base=100 * i), max_tokens=3))
    steps, outs, _ = run(s)
    assert all(r.num_scheduled_tokens <= 64 for r in steps)
    assert len(outs) == 5


def test_chunked_prefill_splits_a_long_prompt() -> None:
    s = make(budget=256)
    s.add(req("long", toks(1000), max_tokens=2))
    steps, outs, _ = run(s)
    assert [r.prefill_tokens for r in steps[:4]] == [256, 256, 256, 232]
    assert [bool(r.outputs) for r in steps[:4]] == [False, False, False, True]
    assert outs["long"][0].first


def test_decode_runs_alongside_a_prefill_chunk() -> None:
    s = make(budget=100)
    s.add(req("short", toks(10), max_tokens=20))
    s.step()
    s.add(req("long", toks(500, base=1000)))
    r = s.step()
    assert (r.decode_seqs, r.prefill_tokens) == (1, 99)  # the decode takes 1 token of the budget


def test_decode_steps_are_shorter_than_prefill_steps() -> None:
    s = make()
    s.add(req("a", toks(200), max_tokens=5))
    steps, _, _ = run(s)
    assert steps[0].prefill_tokens == 200
    assert all(r.decode_seqs == 1 and r.duration_s < steps[0].duration_s for r in steps[1:])


def test_cached_prompt_gets_a_faster_first_token() -> None:
    s = make()
    s.add(req("cold", toks(500), max_tokens=1))
    _, _, cold = run(s)
    s.add(req("warm", toks(500), max_tokens=1))
    _, _, warm = run(s)
    assert warm["warm"] < cold["cold"] / 5


def test_waiting_requests_are_admitted_in_arrival_order() -> None:
    s = make(max_num_seqs=1)
    for rid in ("a", "b", "c"):
        s.add(req(rid, toks(10, base=ord(rid) * 100), max_tokens=2))
    steps, _, _ = run(s)
    firsts = [o.request_id for r in steps for o in r.outputs if o.first]
    assert firsts == ["a", "b", "c"]


# ----------------------------------------------------------------------------------- memory pressure


def test_preemption_recomputes_the_most_recent_request() -> None:
    # 8 blocks of 16: two 48-token prompts fit (6 blocks); growing both to 80 tokens cannot.
    s = make(num_blocks=8)
    s.add(req("old", toks(48), max_tokens=30))
    s.add(req("new", toks(48, base=1000), max_tokens=30))
    steps, outs, _ = run(s)
    preempted = [rid for r in steps for rid in r.preempted]
    assert preempted and preempted[0] == "new"
    assert s.stats.preemptions == len(preempted)
    for rid in ("old", "new"):
        assert outs[rid][-1].completion_tokens == 30
        assert outs[rid][-1].finish_reason == "length"
        assert sum(o.first for o in outs[rid]) == 1  # recompute does not restart the stream
    assert s.kv.num_used_blocks == 0


# ------------------------------------------------------------------------------- outputs and lifecycle


def test_output_is_exactly_max_tokens_without_stop() -> None:
    s = make()
    s.add(req("a", toks(10), max_tokens=7))
    _, outs, _ = run(s)
    assert [o.completion_tokens for o in outs["a"]] == list(range(1, 8))
    assert [o.finish_reason for o in outs["a"]] == [None] * 6 + ["length"]


def test_stop_string_truncates_and_finishes() -> None:
    free = make()
    free.add(req("a", toks(10), max_tokens=50, seed=3))
    _, outs, _ = run(free)
    full = "".join(o.text for o in outs["a"])
    word = full.split()[3]
    cut = full.index(" " + word) + 1  # where the stop string first appears
    s = make()
    s.add(req("a", toks(10), max_tokens=50, seed=3, stop=(" " + word,)))
    _, outs, _ = run(s)
    assert outs["a"][-1].finish_reason == "stop"
    assert "".join(o.text for o in outs["a"]) == full[: cut - 1]
    assert outs["a"][-1].completion_tokens < 50


def test_same_seed_gives_same_outputs_and_timings() -> None:
    def trace(seed: int) -> list[tuple[float, list[tuple[str, str, str | None]]]]:
        s = make(num_blocks=12, max_num_seqs=4, budget=64)
        for i in range(6):
            s.add(req(f"r{i}", toks(30 + 7 * i, base=i % 2 * 1000), max_tokens=12, seed=seed + i))
        steps, _, _ = run(s)
        return [(r.duration_s, [(o.request_id, o.text, o.finish_reason) for o in r.outputs]) for r in steps]

    assert trace(1) == trace(1)
    assert trace(1) != trace(2)


def test_abort_frees_blocks_at_once() -> None:
    s = make(max_num_seqs=1)
    s.add(req("run", toks(100), max_tokens=100))
    s.add(req("wait", toks(100, base=500), max_tokens=100))
    s.step()
    assert s.kv.num_used_blocks == 7
    assert s.abort("run") and s.abort("wait")
    assert s.kv.num_used_blocks == 0
    assert not s.has_work
    assert not s.abort("run")


def test_too_long_prompt_is_rejected() -> None:
    s = make(num_blocks=4, max_model_len=4096)  # the cache holds 64 tokens, so that is the real limit
    with pytest.raises(PromptTooLong):
        s.add(req("big", toks(100)))
    with pytest.raises(PromptTooLong):
        s.add(req("fits-prompt-not-output", toks(60), max_tokens=10))
    s.add(req("ok", toks(60), max_tokens=4))
    assert s.config.effective_max_model_len == 64


def test_empty_prompt_and_duplicate_ids_are_rejected() -> None:
    s = make()
    with pytest.raises(BackendError) as exc:
        s.add(req("empty", []))
    assert exc.value.status == 400
    s.add(req("dup", toks(5)))
    with pytest.raises(BackendError):
        s.add(req("dup", toks(5)))
