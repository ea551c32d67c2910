"""round_robin, random, least_load, power_of_two and the registry."""

import random
from collections import Counter

import pytest
from policy_fixtures import reported, request, view, views

from router.policies import DEFAULT_POLICY, POLICY_NAMES, Decision, Policy, create_policy, policy_parameters

F = request("x" * 200)


def picks(policy, replicas, n):
    out = []
    for _ in range(n):
        d = policy.choose(F, replicas)
        policy.on_dispatch(F, d)
        out.append(d.replica)
    return out


def test_round_robin_rotates_through_the_replicas_in_order():
    assert picks(create_policy("round_robin"), views("a", "b", "c"), 6) == list("abcabc")


def test_random_is_reproducible_with_a_seed_and_uses_every_replica():
    a = picks(create_policy("random", seed=3), views("a", "b", "c"), 60)
    assert a == picks(create_policy("random", seed=3), views("a", "b", "c"), 60)
    assert set(a) == {"a", "b", "c"}


def test_random_follows_weights():
    replicas = [view("heavy", weight=9.0), view("light", weight=1.0)]
    counts = Counter(picks(create_policy("random", rng=random.Random(1)), replicas, 1000))
    assert counts["heavy"] > 800


def test_least_load_prefers_fewer_requests_then_fewer_queued_tokens():
    replicas = [
        view("busy", in_flight_requests=3),
        view("long", in_flight_requests=1, in_flight_tokens=5000),
        view("short", in_flight_requests=1, in_flight_tokens=10),
    ]
    assert create_policy("least_load").choose(F, replicas).replica == "short"


def test_least_load_counts_the_engine_queue_only_while_fresh():
    replicas = [
        view("fresh", in_flight_requests=1, running=1, waiting=8, load_age_s=0.1),
        reported("stale", running=50, waiting=50, report_age_s=30.0, in_flight_requests=2),
    ]
    assert create_policy("least_load").choose(F, replicas).replica == "stale"


def test_least_load_divides_load_by_weight():
    replicas = [view("big", weight=4.0, in_flight_requests=3), view("small", in_flight_requests=1)]
    assert create_policy("least_load").choose(F, replicas).replica == "big"


def test_power_of_two_picks_the_less_loaded_of_two_samples():
    replicas = [view("idle"), view("busy", in_flight_requests=50)]
    assert set(picks(create_policy("power_of_two", seed=1), replicas, 20)) == {"idle"}


def test_power_of_two_with_one_replica_just_uses_it():
    assert create_policy("power_of_two").choose(F, views("only")).reason == "only_replica"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_satisfies_the_protocol_and_needs_a_replica(name):
    policy = create_policy(name, seed=0)
    assert isinstance(policy, Policy) and policy.name == name
    decision = policy.choose(F, views("a", "b"))
    assert isinstance(decision, Decision) and decision.replica in {"a", "b"} and decision.reason
    with pytest.raises(ValueError):
        policy.choose(F, [])


def test_the_registry_names_every_policy_and_defaults_to_cost():
    assert set(POLICY_NAMES) == {
        "round_robin",
        "random",
        "least_load",
        "power_of_two",
        "consistent_hash",
        "cache_aware",
        "cost",
        "precise",
    }
    assert DEFAULT_POLICY == "cost"
    assert policy_parameters("cache_aware")["cache_threshold"] == 0.3


def test_the_registry_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown policy"):
        create_policy("fastest")
    with pytest.raises(ValueError, match="no parameter"):
        create_policy("round_robin", cache_threshold=0.5)


def test_each_created_policy_is_independent():
    a, b = create_policy("round_robin"), create_policy("round_robin")
    picks(a, views("x", "y"), 1)
    assert b.choose(F, views("x", "y")).replica == "x"
