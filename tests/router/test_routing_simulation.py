"""Policies judged by outcome on a virtual-time fleet (see sim_harness): hit rate, spread, stickiness.

Workloads are the two shapes that separate prefix-aware routers in practice:
(a) shared-prefix groups (SGLang's generated-shared-prefix): 16 groups x 8 questions, 2000-token system
    prompts, 4 replicas whose caches hold about 6 system prompts each;
(b) multi-turn chats that all start with ONE shared system prompt (a third of the first turn), 16
    conversations x 6 turns, where peers pin every conversation to one replica.
"""

from collections import Counter
from dataclasses import replace
from functools import cache

import pytest
from sim_harness import Fleet, PinByKey, SimResult, multi_turn_chats, shared_prefix_groups, simulate

from router.policies import create_policy

REPLICAS = 4


@cache
def groups_workload(groups: int = 16, questions: int = 8, clients: int = 16):
    return shared_prefix_groups(
        groups=groups,
        questions=questions,
        system_chars=8000,
        question_chars=400,
        clients=clients,
        max_tokens=32,
        seed=7,
    )


@cache
def chats_workload():
    return multi_turn_chats(
        conversations=16, turns=6, system_chars=2000, first_user_chars=4000, answer_chars=400, user_chars=800,
        max_tokens=32, seed=7,
    )  # fmt: skip


GROUPS_FLEET = Fleet(replicas=REPLICAS, capacity_blocks=800)
CHATS_FLEET = Fleet(replicas=REPLICAS, capacity_blocks=1500)


@cache
def run(policy: str, workload: str, silent: frozenset[str] = frozenset()) -> SimResult:
    fleet = GROUPS_FLEET if workload == "groups" else CHATS_FLEET
    fleet = replace(fleet, silent=silent)
    chosen = PinByKey() if policy == "pinned" else create_policy(policy, seed=1)
    return simulate(chosen, groups_workload() if workload == "groups" else chats_workload(), fleet)


def stickiness(result: SimResult) -> float:
    """Share of requests that went to their conversation's usual replica."""
    usual = sum(Counter(places).most_common(1)[0][1] for places in result.placements.values())
    return usual / sum(len(p) for p in result.placements.values())


# -- the harness itself ------------------------------------------------------------------------------


def test_pinning_each_group_reaches_the_analytic_best_hit_rate():
    # Each group's first request misses; the other 7 reuse its 125 system blocks (2000 tokens).
    prompt_tokens = -(-8401 // 4)
    best = 16 * 7 * 2000 / (16 * 8 * prompt_tokens)
    assert run("pinned", "groups").hit_rate == pytest.approx(best)


def test_the_simulation_is_deterministic():
    once = simulate(create_policy("cost", seed=1), groups_workload(), GROUPS_FLEET)
    again = simulate(create_policy("cost", seed=1), groups_workload(), GROUPS_FLEET)
    assert (once.requests, once.cached_tokens, once.ttfts) == (
        again.requests,
        again.cached_tokens,
        again.ttfts,
    )


# -- (a) shared-prefix groups ------------------------------------------------------------------------


def test_a_cost_reaches_90_percent_of_the_best_hit_rate():
    assert run("cost", "groups").hit_rate >= 0.9 * run("pinned", "groups").hit_rate


def test_a_cost_hits_far_more_than_round_robin():
    assert run("cost", "groups").hit_rate >= run("round_robin", "groups").hit_rate + 0.3


def test_a_cost_keeps_requests_spread():
    assert run("cost", "groups").imbalance(REPLICAS) <= 1.3


def test_a_cost_first_tokens_are_faster_than_round_robin():
    assert run("cost", "groups").ttft_p90() < run("round_robin", "groups").ttft_p90()


# -- (b) multi-turn chats sharing one system prompt --------------------------------------------------


def test_b_cost_spreads_conversations_over_replicas():
    assert run("cost", "chats").imbalance(REPLICAS) <= 1.3


def test_b_cost_keeps_each_conversation_on_its_replica():
    cost = run("cost", "chats")
    assert stickiness(cost) >= 0.95
    assert cost.hit_rate >= 0.95 * run("pinned", "chats").hit_rate


def test_b_cost_hits_more_than_round_robin():
    assert run("cost", "chats").hit_rate >= run("round_robin", "chats").hit_rate + 0.2


# -- (c) the peer failure mode, reproduced on purpose -------------------------------------------------


def test_c_cache_aware_piles_every_conversation_onto_one_replica():
    cache_aware = run("cache_aware", "chats")
    assert max(cache_aware.requests.values()) >= 0.9 * sum(cache_aware.requests.values())
    assert cache_aware.ttft_p90() > 2 * run("cost", "chats").ttft_p90()


# -- (d) a replica that never reports load still gets its share ---------------------------------------


@pytest.mark.parametrize("workload", ["groups", "chats"])
def test_d_a_replica_without_load_reports_still_receives_traffic(workload):
    result = run("cost", workload, silent=frozenset({"r0"}))
    fair = sum(result.requests.values()) / REPLICAS
    assert 0.5 * fair <= result.requests["r0"] <= 1.5 * fair


# -- a hot shared prefix gets replicated instead of queueing on one replica ---------------------------


def test_a_hot_prefix_is_replicated_once_its_replica_queues_up():
    hot = groups_workload(groups=1, questions=256, clients=64)
    cost = simulate(create_policy("cost", seed=1), hot, GROUPS_FLEET)
    piled = simulate(create_policy("cache_aware", seed=1), hot, GROUPS_FLEET)
    assert min(cost.requests[f"r{i}"] for i in range(REPLICAS)) >= 0.15 * 256
    assert cost.reasons["replicate"] >= REPLICAS - 1
    assert cost.ttft_p90() < 0.5 * piled.ttft_p90()
