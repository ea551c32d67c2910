"""The offline fleet simulator: deterministic, conserving, bounded, and faithful to the cache bound."""

from __future__ import annotations

import pytest

from benchmarks.lib import workloads as wl
from benchmarks.lib.loadgen import LoadSpec, arrival_times
from benchmarks.lib.metrics import summarize_run
from benchmarks.sim_engines import ChainEncoder
from benchmarks.simulate import PROFILE_COST_PARAMS, PromptEncoder, main, scale_workload, simulate
from engine_server.sim.tokenizer import SimTokenizer


def small_gsp() -> wl.Workload:
    return wl.gsp(groups=8, questions=6, system_tokens=256, question_tokens=32, output_tokens=8, seed=3)


def small_multiturn() -> wl.Workload:
    return wl.multiturn(conversations=6, turns=4, system_tokens=64, first_user_tokens=128, user_tokens=32,
                        output_tokens=8, seed=3)


def key(run) -> list[tuple]:
    return [(r.session, r.turn, r.status, r.start_s, r.e2e_s, r.ttft_s, r.prompt_tokens, r.cached_tokens,
             r.output_tokens, r.replica) for r in run.records]


def test_same_seed_same_records() -> None:
    w = small_gsp()
    kv = wl.kv_blocks_per_replica(w, 4)
    runs = [simulate(w, 4, "cost", PROFILE_COST_PARAMS["llmd-8b"], num_blocks=kv, load=LoadSpec(concurrency=8),
                     seed=5) for _ in range(2)]
    assert key(runs[0]) == key(runs[1])
    assert runs[0].reasons == runs[1].reasons


def test_fast_output_tokens_change_no_metric() -> None:
    """The cheap output stream only replaces generated ids; timings and cache hits stay identical."""
    w = small_multiturn()
    a, b = (simulate(w, 2, "round_robin", num_blocks=256, load=LoadSpec(concurrency=3), exact_tokens=x)
            for x in (False, True))
    assert key(a) == key(b)


@pytest.mark.parametrize("spec", [LoadSpec(concurrency=5), LoadSpec(rate=4.0, seed=2)])
def test_every_request_recorded_once_turns_in_order(spec: LoadSpec) -> None:
    w = small_multiturn()
    run = simulate(w, 3, "cost", num_blocks=512, load=spec)
    assert run.stopped_by == "done"
    assert sorted((r.session, r.turn) for r in run.records) == sorted(
        (s.id, t) for s in w.sessions for t in range(len(s.turns)))
    assert all(r.ok and r.output_tokens == 8 and r.ttft_s is not None for r in run.records)
    by_session: dict[str, list] = {}
    for r in run.records:
        by_session.setdefault(r.session, []).append(r)
    for recs in by_session.values():
        recs.sort(key=lambda r: r.turn)
        for prev, nxt in zip(recs, recs[1:], strict=False):
            assert nxt.start_s >= prev.start_s + prev.e2e_s - 1e-12  # the next turn waits for the previous
    assert sum(run.per_replica.values()) == w.num_requests
    if spec.mode == "rate":  # sessions start at the load generator's seeded Poisson times
        starts = {r.session: r.start_s for r in run.records if r.turn == 0}
        expected = dict(zip((s.id for s in w.sessions), arrival_times(w, spec), strict=True))
        assert starts == pytest.approx(expected)


def test_prefix_aware_beats_round_robin_on_gsp() -> None:
    w = small_gsp()
    kv = wl.kv_blocks_per_replica(w, 4)
    hit = {p: summarize_run(r.records, r.wall_s)["hit_rate"] for p in ("cost", "round_robin", "cache_aware")
           for r in [simulate(w, 4, p, PROFILE_COST_PARAMS["llmd-8b"] if p == "cost" else {}, num_blocks=kv,
                              load=LoadSpec(concurrency=8))]}
    assert hit["cost"] >= hit["round_robin"] + 0.2
    assert hit["cache_aware"] >= hit["round_robin"] + 0.2


@pytest.mark.parametrize("make", [small_gsp, small_multiturn])
def test_single_replica_ample_cache_equals_oracle(make) -> None:
    """One replica whose cache never evicts is the pooled cache of `workloads.oracle`: same tokens hit.

    Sequential clients make the order the oracle's canonical order; the engine's block chain over token
    ids and the oracle's over 64-character texts cut at the same places, and both leave the last token.
    """
    w = make()
    run = simulate(w, 1, "round_robin", profile="instant", num_blocks=8192, load=LoadSpec(concurrency=1))
    bound = wl.oracle(w, 1 << 30)
    assert sum(r.cached_tokens for r in run.records) == bound.cached_tokens
    assert sum(r.prompt_tokens for r in run.records) == bound.prompt_tokens


def test_bounded_runs_stop() -> None:
    w = small_gsp()
    by_time = simulate(w, 2, "round_robin", num_blocks=512, load=LoadSpec(concurrency=2, max_s=1.0))
    assert by_time.stopped_by == "time"
    assert 0 < len(by_time.records) < w.num_requests
    assert max(r.start_s for r in by_time.records) <= 1.0
    by_count = simulate(w, 2, "round_robin", num_blocks=512, load=LoadSpec(concurrency=4, max_requests=10))
    assert by_count.stopped_by == "count" and len(by_count.records) == 10
    by_rate = simulate(w, 2, "round_robin", num_blocks=512, load=LoadSpec(rate=50.0, max_requests=7))
    assert len(by_rate.records) == 7
    real = simulate(w, 2, "round_robin", num_blocks=512, load=LoadSpec(concurrency=4), max_real_s=0.0)
    assert real.stopped_by == "time" and len(real.records) < w.num_requests


def test_prompt_encoder_matches_the_engine() -> None:
    enc = PromptEncoder()
    tok = SimTokenizer()
    for w in (small_multiturn(), small_gsp(), wl.agentic(sessions=3, steps=3, seed=1)):
        for req in w.requests():
            ids, text = enc.encode(req.messages)
            assert text == enc.render(req.messages)
            assert ids == tok.encode(text)


def test_scale_workload_is_lazy_and_gsp_shaped() -> None:
    w = scale_workload(1000, 10, seed=1)
    assert w.num_requests == 1000 and len(w.sessions) == 1000
    s = w.sessions[999]
    assert s.turns[0].messages[0]["content"].startswith("Group ") and s.turns[0].max_tokens == 32
    run = simulate(w, 10, "consistent_hash", load=LoadSpec(concurrency=20, max_requests=200), keep_itl=False)
    assert len(run.records) == 200 and run.stopped_by == "count"


def test_cli_writes_json(tmp_path) -> None:
    out = tmp_path / "sim.json"
    assert main(["--workload", "gsp", "--policies", "round_robin,cost", "--requests", "40", "--out", str(out)]) == 0
    assert out.exists() and "cost" in out.read_text()


# -- the fast engine model (engine_server.sim.fast) ------------------------------------------------------


@pytest.mark.parametrize("name", ["gsp", "multiturn"])
@pytest.mark.parametrize("policy", ["cost", "round_robin"])
def test_fast_engine_agrees_with_exact(name: str, policy: str) -> None:
    """Same batching and cache rules, decode windows in one event: same hit rate, TTFT within 10 %.

    The default-sized workloads (256 and 192 requests): with a few dozen, one tie broken the other way moves
    a percentile by a whole prefill step.
    """
    w = wl.build(name, seed=1)[0]
    kv = wl.kv_blocks_per_replica(w, 4)
    params = PROFILE_COST_PARAMS["llmd-8b"] if policy == "cost" else {}
    runs = {e: simulate(w, 4, policy, params, num_blocks=kv, load=LoadSpec(concurrency=16), engine=e)
            for e in ("exact", "fast")}
    exact, fast = (summarize_run(runs[e].records, runs[e].wall_s) for e in ("exact", "fast"))
    assert len(runs["fast"].records) == w.num_requests
    assert abs(fast["hit_rate"] - exact["hit_rate"]) <= 0.02
    for q in ("p50", "p90"):
        assert fast["ttft_ms"][q] == pytest.approx(exact["ttft_ms"][q], rel=0.10)
    assert runs["fast"].events < runs["exact"].events / 2  # the point: O(1) events per request, not O(tokens)


def test_fast_engine_is_deterministic() -> None:
    w = small_multiturn()
    runs = [simulate(w, 4, "cost", PROFILE_COST_PARAMS["llmd-8b"], num_blocks=256, load=LoadSpec(concurrency=8),
                     seed=5, engine="fast") for _ in range(2)]
    assert key(runs[0]) == key(runs[1])
    assert [r.itl_s for r in runs[0].records] == [r.itl_s for r in runs[1].records]


@pytest.mark.parametrize("make", [small_gsp, small_multiturn])
def test_fast_engine_single_replica_equals_oracle(make) -> None:
    """Hash chains over 64-character slices hit exactly the tokens the engine's chains over ids do."""
    w = make()
    run = simulate(w, 1, "round_robin", profile="instant", num_blocks=8192, load=LoadSpec(concurrency=1),
                   engine="fast")
    bound = wl.oracle(w, 1 << 30)
    assert sum(r.cached_tokens for r in run.records) == bound.cached_tokens
    assert sum(r.prompt_tokens for r in run.records) == bound.prompt_tokens


def test_chain_encoder_matches_engine_block_count() -> None:
    enc, chains = PromptEncoder(), ChainEncoder()
    for w in (small_multiturn(), small_gsp(), wl.agentic(sessions=3, steps=3, seed=1)):
        for req in w.requests():
            ids, _ = enc.encode(req.messages)
            n, chain = chains.encode(req.messages)
            assert n == len(ids) and len(chain) == len(ids) // 16


def test_fast_engine_under_memory_pressure_finishes_everything() -> None:
    """A cache too small for the batch preempts and recomputes; every request still completes once."""
    w = small_multiturn()
    runs = {e: simulate(w, 2, "round_robin", num_blocks=40, load=LoadSpec(concurrency=8), engine=e)
            for e in ("exact", "fast")}
    fast = runs["fast"]
    assert fast.preemptions == runs["exact"].preemptions > 0 and len(fast.records) == w.num_requests
    assert all(r.ok and r.output_tokens == 8 for r in fast.records)
