"""consistent_hash: bounded-load consistent hashing on the session key or the prompt prefix."""

from collections import Counter

from policy_fixtures import features_with, request, view, views

from router.policies.consistent_hash import ConsistentHash

NAMES = ("a", "b", "c", "d")


def ring(**kw):
    policy = ConsistentHash(seed=0, **kw)
    for n in NAMES:
        policy.on_replica_added(n)
    return policy


def test_the_same_prompt_prefix_always_maps_to_the_same_replica():
    policy = ring()
    first = policy.choose(features_with(20, "x"), views(*NAMES)).replica
    assert all(policy.choose(features_with(20 + i, "x"), views(*NAMES)).replica == first for i in range(5))


def test_the_affinity_key_wins_over_the_prompt():
    policy = ring()
    picks = {policy.choose(features_with(20, t, affinity_key="s1"), views(*NAMES)).replica for t in "pqrs"}
    assert len(picks) == 1


def test_different_keys_spread_over_the_ring():
    policy = ring()
    counts = Counter(policy.choose(request("", rid=f"r{i}"), views(*NAMES)).replica for i in range(400))
    assert set(counts) == set(NAMES) and max(counts.values()) < 160


def test_a_replica_over_the_load_bound_spills_to_its_ring_successor():
    policy = ring()
    f = features_with(20, "hot")
    home = policy.choose(f, views(*NAMES)).replica
    loaded = [view(n, in_flight_requests=10 if n == home else 0) for n in NAMES]
    decision = policy.choose(f, loaded)
    assert decision.replica != home and decision.reason == "ring_overflow"


def test_the_bound_is_ceil_of_mean_times_load_factor():
    policy = ring(load_factor=1.25)
    f = features_with(20, "hot")
    home = policy.choose(f, views(*NAMES)).replica
    # total 8, n 4: avg (8 + 1) / 4 = 2.25, bound ceil(2.8125) = 3: the home at 2 may take one more.
    at_two = [view(n, in_flight_requests=2) for n in NAMES]
    assert policy.choose(f, at_two).replica == home
    skewed = [view(n, in_flight_requests=3 if n == home else 1) for n in NAMES]
    assert policy.choose(f, skewed).replica != home


def test_removing_a_replica_moves_only_its_keys():
    policy = ring()
    keys = [request("", rid=f"k{i}") for i in range(200)]
    before = {k.request_id: policy.choose(k, views(*NAMES)).replica for k in keys}
    policy.on_replica_removed("d")
    after = {k.request_id: policy.choose(k, views("a", "b", "c")).replica for k in keys}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k in before if before[k] == "d"}


def test_replicas_never_announced_still_join_the_ring():
    policy = ConsistentHash(seed=0)
    assert policy.choose(request("", rid="x"), views("p", "q")).replica in {"p", "q"}


def test_ineligible_replicas_on_the_ring_are_skipped():
    policy = ring()
    assert all(policy.choose(request("", rid=f"r{i}"), views("c")).replica == "c" for i in range(20))
