"""cache_aware: SGLang-style prefix affinity with an absolute+relative imbalance trigger."""

from policy_fixtures import features_with, view, views

from router.policies.cache_aware import CacheAware


def dispatched(policy, features, replicas):
    decision = policy.choose(features, replicas)
    policy.on_dispatch(features, decision)
    return decision


def test_a_prompt_goes_where_its_prefix_was_sent():
    policy = CacheAware(seed=0)
    first = dispatched(policy, features_with(10, "x"), views("a", "b", "c"))
    again = policy.choose(features_with(12, "x"), views("a", "b", "c"))
    assert again.replica == first.replica and again.reason == "cache_hit" and again.matched_blocks == 10


def test_a_weak_match_goes_to_the_smallest_index_instead():
    policy = CacheAware(seed=0, cache_threshold=0.5)
    dispatched(policy, features_with(10, "x"), views("a"))
    dispatched(policy, features_with(30, "y"), views("b"))
    decision = policy.choose(features_with(25, "x"), views("a", "b", "c"))  # matches 10/25 = 0.4 on a
    assert decision.replica == "c" and decision.reason == "smallest_tree"


def test_imbalance_needs_both_the_absolute_and_the_relative_gap():
    policy = CacheAware(seed=0)
    dispatched(policy, features_with(10, "x"), views("a"))
    f = features_with(10, "x")
    small_gap = [view("a", in_flight_requests=60), view("b", in_flight_requests=0)]
    assert policy.choose(f, small_gap).reason == "cache_hit"  # gap 60 <= 64
    low_ratio = [view("a", in_flight_requests=200), view("b", in_flight_requests=140)]
    assert policy.choose(f, low_ratio).reason == "cache_hit"  # 200 <= 1.5 * 140
    both = [view("a", in_flight_requests=100), view("b", in_flight_requests=10)]
    decision = policy.choose(f, both)
    assert (decision.replica, decision.reason) == ("b", "imbalanced")


def test_choose_alone_does_not_touch_the_index():
    policy = CacheAware(seed=0)
    policy.choose(features_with(10, "x"), views("a", "b"))
    assert policy.index.size() == 0


def test_a_removed_replica_leaves_the_index():
    policy = CacheAware(seed=0)
    dispatched(policy, features_with(10, "x"), views("a"))
    policy.on_replica_removed("a")
    assert policy.index.size() == 0
