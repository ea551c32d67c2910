"""cost's ``index`` option: which prefix matches it prices when the engines' KV events say what they hold
(`router.policies.kv_match`). The events are faked through the small protocol the policy reads."""

from __future__ import annotations

import dataclasses
import random

import pytest
from policy_fixtures import features_with, view, views

from router.features import RequestFeatures
from router.policies.base import Outcome
from router.policies.cost import Cost
from router.policies.registry import create_policy
from router.replica_view import ReplicaView


class FakeMatch:
    """`KVMatch` with fixed per-replica answers: ``{replica: (blocks of the request's chain, status)}``."""

    def __init__(self, features: RequestFeatures, held: dict[str, tuple[int, str]]) -> None:
        self.token_ids = list(range(features.token_estimate))  # one id per estimated token: units line up
        self._held = held
        self._block = features.block_tokens

    def match(self):
        return dict(self._held)

    def cached_tokens(self, replica):
        blocks, status = self._held.get(replica, (0, "unsynced"))
        return int(blocks * self._block) if status in ("synced", "partial") else None


def with_events(features: RequestFeatures, **held: tuple[int, str]) -> RequestFeatures:
    return dataclasses.replace(features, kv_match=FakeMatch(features, held))


def sent(policy: Cost, features: RequestFeatures, replica: str) -> None:
    """The policy sent ``features`` to ``replica`` (its approximate index now believes it is there)."""
    decision = policy.choose(features, views(replica))
    policy.on_dispatch(features, decision)
    policy.on_complete(features, decision, Outcome(ok=True, status=200, ttft_s=0.1))


def test_a_synced_replicas_exact_match_wins_over_a_wrong_approximate_guess():
    policy = Cost(seed=0, index="precise")
    sent(policy, features_with(40, "x"), "a")  # the guess: a holds it; the engine has evicted it since
    request = with_events(features_with(41, "x"), a=(0, "synced"), b=(40, "synced"))
    decision = policy.choose(request, views("a", "b"))
    assert (decision.replica, decision.reason, decision.matched_blocks) == ("b", "prefix", 40)


def test_the_approximate_index_ignores_the_events():
    policy = Cost(seed=0, index="approximate")
    sent(policy, features_with(40, "x"), "a")
    request = with_events(features_with(41, "x"), a=(0, "synced"), b=(40, "synced"))
    assert policy.choose(request, views("a", "b")).replica == "a"


@pytest.mark.parametrize("mode", ["precise", "auto"])
@pytest.mark.parametrize("status", ["stale", "unsynced"])
def test_a_replica_whose_events_are_not_trusted_falls_back_to_the_approximate_index(mode, status):
    policy = Cost(seed=0, index=mode)
    sent(policy, features_with(40, "x"), "a")
    request = with_events(features_with(41, "x"), a=(0, status), b=(40, status))
    decision = policy.choose(request, views("a", "b"))
    assert (decision.replica, decision.matched_blocks) == ("a", 40)


def test_auto_takes_the_larger_of_a_partial_replicas_lower_bound_and_the_guess():
    policy = Cost(seed=0, index="auto")
    sent(policy, features_with(40, "x"), "a")
    guess_larger = with_events(features_with(41, "x"), a=(10, "partial"))
    events_larger = with_events(features_with(41, "y"), a=(30, "partial"))
    assert policy.choose(guess_larger, views("a")).matched_blocks == 40
    assert policy.choose(events_larger, views("a")).matched_blocks == 30


def test_precise_takes_a_partial_replicas_events_as_they_are():
    policy = create_policy("precise", seed=0)
    sent(policy, features_with(40, "x"), "a")
    assert policy.choose(with_events(features_with(41, "x"), a=(10, "partial")), views("a")).matched_blocks == 10


def test_a_sent_request_counts_as_held_while_in_flight_and_kv_hold_s_after():
    # Its BlockStored may not have been read yet: a burst sharing a new prefix must not scatter meanwhile,
    # nor a chat's next turn, sent the moment the answer ends, miss its own history.
    now = [100.0]
    policy = Cost(seed=0, index="precise", kv_hold_s=2.0)
    policy._in_flight_blocks.clock = lambda: now[0]
    first = with_events(features_with(40, "x"), a=(0, "synced"), b=(0, "synced"))
    decision = policy.choose(first, views("a", "b"))
    policy.on_dispatch(first, decision)
    other = "b" if decision.replica == "a" else "a"
    follow = with_events(features_with(41, "x"), a=(0, "synced"), b=(0, "synced"))
    held = policy.choose(follow, [view(decision.replica, in_flight_requests=1), view(other)])
    assert (held.replica, held.matched_blocks) == (decision.replica, 40)
    policy.on_complete(first, decision, Outcome(ok=True, status=200, ttft_s=0.1))
    now[0] += 1.9
    assert policy.choose(follow, views(decision.replica)).matched_blocks == 40
    now[0] += 0.2
    assert policy.choose(follow, views(decision.replica)).matched_blocks == 0  # the events say evicted


def test_without_kv_match_every_index_mode_decides_exactly_as_before():
    def run(policy: Cost) -> list[tuple[str, str, int]]:
        rng = random.Random(7)
        out = []
        for i in range(200):
            features = features_with(rng.randrange(1, 60), rng.choice("abcdef"), rid=f"r{i}")
            replicas = [view(n, in_flight_requests=rng.randrange(3), in_flight_tokens=rng.randrange(2000))
                        for n in ("a", "b", "c", "d")]
            d = policy.choose(features, replicas)
            policy.on_dispatch(features, d)
            if rng.random() < 0.7:
                policy.on_complete(features, d, Outcome(ok=True, status=200, ttft_s=0.1,
                                                        cached_tokens=rng.randrange(0, 500), prompt_tokens=500))
            out.append((d.replica, d.reason, d.matched_blocks))
        return out

    today = run(Cost(seed=3))
    for mode in ("approximate", "auto", "precise"):
        assert run(Cost(seed=3, index=mode)) == today


def test_the_candidate_pre_filter_prices_a_replica_only_the_events_say_holds_the_prompt():
    names = [f"r{i:02d}" for i in range(40)]  # over 4 x 8: the filter is on
    policy = Cost(seed=0, index="precise")
    policy.choose(features_with(5, "warm"), views(*names))  # the first decision prices all and builds the order
    busy = [view(n, in_flight_requests=1 if n == "r20" else 0) for n in names]  # r20 is not among the least loaded
    request = with_events(features_with(100, "x"), r20=(100, "synced"))
    decision = policy.choose(request, busy)
    assert (decision.replica, decision.matched_blocks) == ("r20", 100)


def test_an_unknown_index_mode_is_rejected():
    with pytest.raises(ValueError, match="index must be one of"):
        Cost(index="exact")


def test_by_default_a_completed_requests_blocks_are_whatever_the_events_say():
    policy = Cost(seed=0, index="precise")
    first = with_events(features_with(40, "x"), a=(0, "synced"))
    decision = policy.choose(first, views("a"))
    policy.on_dispatch(first, decision)
    policy.on_complete(first, decision, Outcome(ok=True, status=200, ttft_s=0.1))
    assert policy.choose(with_events(features_with(41, "x"), a=(0, "synced")), views("a")).matched_blocks == 0


def queued(name: str, *, kv_used: int, waiting: int = 1) -> ReplicaView:
    """A replica whose fresh report says: 100 KV blocks of 16 tokens, ``kv_used`` referenced by the requests
    it admitted, ``waiting`` prompts queued for admission."""
    return view(name, load_age_s=0.1, kv_blocks_total=100, kv_blocks_used=kv_used, block_size=16, waiting=waiting)


def test_an_announced_match_counts_only_the_blocks_the_prompts_queued_ahead_leave_unevicted():
    # 60 free blocks (960 tokens); the waiting prompt (priced at the average uncached request, 640 tokens)
    # is admitted first and evicts unreferenced blocks: at most 20 of the 40 survive.
    policy = Cost(seed=0, index="precise")
    sent(policy, features_with(40, "x"), "a")
    request = with_events(features_with(40, "x"), a=(40, "synced"))
    assert policy.choose(request, [queued("a", kv_used=40)]).matched_blocks == 20
    assert policy.choose(request, [queued("a", kv_used=90)]).matched_blocks == 0  # a full cache keeps none


def test_announced_blocks_the_guess_has_aged_out_are_the_first_evicted_behind_a_queue():
    # The engine frees blocks into an LRU queue; the guess (an LRU of the engine's size over what was sent)
    # no longer holding them says they are the oldest there, so the waiting prompt evicts them first.
    policy = Cost(seed=0, index="precise")
    sent(policy, features_with(10, "x"), "a")
    request = with_events(features_with(40, "x"), a=(40, "synced"))
    assert policy.choose(request, [queued("a", kv_used=0)]).matched_blocks == 10
    assert policy.choose(request, [queued("a", kv_used=0, waiting=0)]).matched_blocks == 40


def test_an_announced_match_counts_in_full_when_nothing_waits_or_the_report_is_stale():
    policy = Cost(seed=0, index="precise")
    request = with_events(features_with(40, "x"), a=(40, "synced"))
    assert policy.choose(request, [queued("a", kv_used=90, waiting=0)]).matched_blocks == 40  # admitted next step
    stale = dataclasses.replace(queued("a", kv_used=90), load_age_s=None)
    assert policy.choose(request, [stale]).matched_blocks == 40  # free blocks unknown: no bound


def test_the_blocks_its_own_requests_in_flight_pin_survive_a_full_queue():
    policy = Cost(seed=0, index="precise")
    first = with_events(features_with(25, "x"), a=(0, "synced"))
    policy.on_dispatch(first, policy.choose(first, views("a")))  # in flight on a: its 25 blocks are referenced
    request = with_events(features_with(40, "x"), a=(40, "synced"))
    assert policy.choose(request, [queued("a", kv_used=90)]).matched_blocks == 25


def test_the_admission_bound_leaves_the_approximate_index_alone():
    policy = Cost(seed=0, index="approximate")
    sent(policy, features_with(40, "x"), "a")
    request = with_events(features_with(41, "x"), a=(0, "synced"))
    assert policy.choose(request, [queued("a", kv_used=90)]).matched_blocks == 40


def test_with_several_router_processes_the_guess_does_not_bound_an_announced_match():
    # Each process's guess saw only its own requests: a block another process sent is no older for it.
    policy = Cost(seed=0, index="precise", router_processes=2)
    sent(policy, features_with(10, "x"), "a")
    request = with_events(features_with(40, "x"), a=(40, "synced"))
    assert policy.choose(request, [queued("a", kv_used=0)]).matched_blocks == 40
