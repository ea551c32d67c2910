"""cost: estimated time to first token (queue + uncached prefill + decode pressure), minimised."""

import pytest
from policy_fixtures import features_with, reported, view, views

from router.policies.base import Outcome
from router.policies.cost import Cost

OK = Outcome(ok=True, status=200, ttft_s=0.1)


def dispatched(policy, features, replicas):
    decision = policy.choose(features, replicas)
    policy.on_dispatch(features, decision)
    return decision


def completed(policy, features, decision, **outcome):
    policy.on_complete(features, decision, Outcome(**{"ok": True, "status": 200, "ttft_s": 0.1, **outcome}))


def test_a_prompt_goes_to_the_replica_holding_its_prefix():
    policy = Cost(seed=0)
    first = dispatched(policy, features_with(40, "x"), views("a", "b", "c"))
    decision = policy.choose(features_with(45, "x"), views("a", "b", "c"))
    assert (decision.replica, decision.reason, decision.matched_blocks) == (first.replica, "prefix", 40)


def test_a_new_prompt_goes_where_the_least_work_is_queued():
    replicas = [view("a", in_flight_requests=1, in_flight_tokens=4000), view("b")]
    decision = Cost(seed=0).choose(features_with(10, "x"), replicas)
    assert (decision.replica, decision.reason) == ("b", "load")


def test_a_short_queue_does_not_move_a_prefix_away():
    policy = Cost(seed=0)
    dispatched(policy, features_with(100, "x"), views("a"))
    queued = [view("a", in_flight_requests=1, in_flight_tokens=1600), view("b")]
    assert policy.choose(features_with(101, "x"), queued).replica == "a"


def test_the_holder_is_passed_over_once_waiting_costs_more_than_recomputing():
    policy = Cost(seed=0)
    dispatched(policy, features_with(100, "x"), views("a"))
    swamped = [
        view("a", in_flight_requests=40, running=8, waiting=32, load_age_s=0.1),
        view("b", load_age_s=0.1),
    ]
    decision = policy.choose(features_with(101, "x"), swamped)
    assert (decision.replica, decision.reason) == ("b", "replicate")


def test_a_crowded_decode_batch_is_avoided_for_an_uncached_prompt():
    replicas = [view("a", running=60, load_age_s=0.1), view("b", running=2, load_age_s=0.1)]
    assert Cost(seed=0).choose(features_with(10, "x"), replicas).replica == "b"


def test_a_fresh_engine_queue_counts_even_when_the_router_sent_nothing():
    # Another router's traffic: only the engine sees it.
    replicas = [view("a", running=4, waiting=10, load_age_s=0.1), view("b", load_age_s=0.1)]
    assert Cost(seed=0).choose(features_with(10, "x"), replicas).replica == "b"


def test_a_missing_engine_report_does_not_read_as_zero_load():
    replicas = [view("never", in_flight_requests=6, in_flight_tokens=12000), view("fresh", load_age_s=0.1)]
    assert Cost(seed=0).choose(features_with(10, "x"), replicas).replica == "fresh"


def test_a_stale_engine_report_is_ignored_so_it_cannot_starve_a_replica():
    replicas = [
        reported("stale", running=200, waiting=100, report_age_s=60.0),
        view("busy", in_flight_requests=3, in_flight_tokens=3000),
    ]
    assert Cost(seed=0).choose(features_with(10, "x"), replicas).replica == "stale"


def test_a_faster_replica_is_worth_more_load():
    busy = {"in_flight_requests": 1, "in_flight_tokens": 600}
    assert Cost(seed=0).choose(features_with(10), [view("a", **busy), view("b")]).replica == "b"
    replicas = [view("fast", weight=4.0, **busy), view("slow")]
    assert Cost(seed=0).choose(features_with(10), replicas).replica == "fast"


def test_ties_are_broken_by_load_then_by_the_seeded_random_source():
    assert Cost(seed=0).choose(features_with(10), [view("a", in_flight_requests=1), view("b")]).replica == "b"
    seen = {Cost(seed=s).choose(features_with(10), views("a", "b")).replica for s in range(20)}
    assert seen == {"a", "b"}
    assert len({Cost(seed=7).choose(features_with(10), views("a", "b")).replica for _ in range(5)}) == 1


def test_the_decision_carries_every_replicas_cost():
    decision = Cost(seed=0).choose(features_with(10), views("a", "b", "c"))
    assert set(decision.scores) == {"a", "b", "c"} and all(s > 0 for s in decision.scores.values())


def test_choosing_records_nothing_and_a_failed_dispatch_leaves_no_trace():
    policy = Cost(seed=0)
    f = features_with(20, "x")
    policy.choose(f, views("a"))
    assert policy.index.size() == 0
    decision = dispatched(policy, f, views("a"))
    policy.on_complete(f, decision, Outcome(ok=False, status=503, ttft_s=None, error_kind="status_503"))
    assert policy.index.size() == 0


def test_a_request_that_failed_after_its_first_token_keeps_its_entries():
    policy = Cost(seed=0)
    f = features_with(20, "x")
    decision = dispatched(policy, f, views("a"))
    policy.on_complete(f, decision, Outcome(ok=False, status=502, ttft_s=0.2, error_kind="mid_stream"))
    assert policy.index.match(f.block_hashes) == {"a": 20}


def test_the_index_is_sized_from_the_engine_kv_cache():
    policy = Cost(seed=0)
    policy.choose(features_with(2), [view("a", kv_blocks_total=100, block_size=16)])
    assert policy.index.capacity("a") == 100  # 1600 tokens / 16 tokens per 64-char block
    policy.choose(features_with(2), [view("a", kv_blocks_total=50, block_size=16)])
    assert policy.index.capacity("a") == 50


def test_the_index_forgets_what_a_small_engine_cache_cannot_hold():
    policy = Cost(seed=0)
    small = [view("a", kv_blocks_total=30, block_size=16)]
    dispatched(policy, features_with(20, "x"), small)
    dispatched(policy, features_with(20, "y"), small)
    assert policy.index.match(features_with(20, "x").block_hashes) == {"a": 10}  # deepest blocks went first


def test_fewer_cached_tokens_than_predicted_drops_the_unconfirmed_entries():
    policy = Cost(seed=0)
    dispatched(policy, features_with(40, "x"), views("a"))
    f = features_with(41, "x")
    decision = dispatched(policy, f, views("a"))
    assert decision.matched_blocks == 40
    completed(policy, f, decision, prompt_tokens=f.token_estimate, cached_tokens=10 * 16)
    assert policy.index.match(f.block_hashes) == {"a": 10}


def test_rounding_sized_shortfalls_and_surpluses_change_nothing():
    policy = Cost(seed=0)
    dispatched(policy, features_with(40, "x"), views("a"))
    f = features_with(41, "x")
    decision = dispatched(policy, f, views("a"))
    completed(policy, f, decision, prompt_tokens=f.token_estimate, cached_tokens=39 * 16)
    completed(policy, f, decision, prompt_tokens=f.token_estimate, cached_tokens=f.token_estimate)
    assert policy.index.match(f.block_hashes) == {"a": 41}


def test_the_correction_uses_the_engines_own_tokens_per_character():
    policy = Cost(seed=0)
    dispatched(policy, features_with(40, "x"), views("a"))
    f = features_with(41, "x")
    decision = dispatched(policy, f, views("a"))
    # The engine's tokenizer packs 5 chars per token: 40 of 41 blocks cached is 40/41 of its prompt.
    real_prompt = f.prompt_chars // 5
    completed(policy, f, decision, prompt_tokens=real_prompt, cached_tokens=real_prompt * 40 // 41)
    assert policy.index.match(f.block_hashes) == {"a": 41}


def test_completions_release_the_queue_they_added():
    # Pinned: completions would otherwise also teach the constants (tests/router/test_calibration.py).
    policy, fresh = Cost(seed=0, calibration="pinned"), Cost(seed=0, calibration="pinned")
    features = [features_with(30, t) for t in "uvw"]
    decisions = [dispatched(policy, f, views("a")) for f in features]
    for f, d in zip(features, decisions, strict=True):
        completed(policy, f, d, completion_tokens=16)
    probe = features_with(10, "z")
    queued = [view("a", in_flight_requests=0, in_flight_tokens=0)]
    assert policy.choose(probe, queued).scores["a"] == pytest.approx(fresh.choose(probe, queued).scores["a"])


def test_a_removed_replica_is_forgotten():
    policy = Cost(seed=0)
    dispatched(policy, features_with(20, "x"), views("a"))
    policy.on_replica_removed("a")
    assert policy.index.size() == 0 and policy.choose(features_with(20, "x"), views("a")).matched_blocks == 0


@pytest.mark.parametrize(
    "params",
    [{"prefill_s_per_token": -1}, {"work_weight": -1}, {"tie_tolerance": -0.1}, {"kv_capacity_factor": 0}],
)
def test_nonsense_parameters_are_rejected(params):
    with pytest.raises(ValueError):
        Cost(**params)


def test_cold_prefixes_on_an_idle_fleet_go_round_the_replicas_not_by_luck():
    names = ("r0", "r1", "r2", "r3")
    for seed in range(20):  # whatever the tie-break draws, every replica is used before any twice
        policy = Cost(seed=seed)
        picks = [dispatched(policy, features_with(8, f"cold{g}"), views(*names)).replica for g in range(8)]
        assert sorted(picks[:4]) == sorted(names) and sorted(picks[4:]) == sorted(names), picks
