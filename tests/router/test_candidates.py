"""cost's candidate pre-filter: in a large fleet only the prompt's holders and the least loaded are priced."""

import dataclasses
import random

from policy_fixtures import features_with, view
from test_cost_kv_match import FakeMatch

from router.policies import candidates
from router.policies.base import Outcome
from router.policies.candidates import REKEY_PER_DECISION, CandidateFilter
from router.policies.cost import Cost
from router.replica_view import LazyViews

OK = Outcome(ok=True, status=200, ttft_s=0.1)


def fleet(n: int, **loads: int) -> list:
    """``n`` replicas ``r0..``; ``loads`` gives some of them requests in flight."""
    return [view(f"r{i}", in_flight_requests=loads.get(f"r{i}", 0), load_age_s=0.1) for i in range(n)]


def test_a_small_fleet_is_priced_in_full():
    policy = Cost(seed=0, candidates=8)
    for _ in range(3):
        assert len(policy.choose(features_with(4, "x"), fleet(32)).scores) == 32


def test_a_large_fleet_prices_only_the_holders_and_the_least_loaded_after_its_first_decision():
    policy, replicas = Cost(seed=0, candidates=4), fleet(200)
    first = policy.choose(features_with(10, "x"), replicas)  # the first decision is a full pass
    assert len(first.scores) == 200
    policy.on_dispatch(features_with(10, "x"), first)
    again = policy.choose(features_with(12, "x"), replicas)
    assert len(again.scores) <= 2 * 4 + 1 and first.replica in again.scores
    assert (again.replica, again.reason) == (first.replica, "prefix")


def test_the_least_loaded_replica_far_down_the_list_is_found():
    loads = {f"r{i}": 5 for i in range(200) if i != 150}
    policy, replicas = Cost(seed=0, candidates=4), fleet(200, **loads)
    policy.choose(features_with(4, "warm-up"), replicas)
    assert policy.choose(features_with(4, "x"), replicas).replica == "r150"


def test_an_idle_large_fleet_still_goes_round_every_replica():
    policy, replicas = Cost(seed=0, candidates=4), fleet(100)
    chosen = set()
    for i in range(100):
        features = features_with(4, f"cold{i}", rid=f"q{i}")
        decision = policy.choose(features, replicas)
        policy.on_dispatch(features, decision)
        policy.on_complete(features, decision, OK)
        chosen.add(decision.replica)
    assert len(chosen) == 100


def test_a_replica_joining_a_large_fleet_is_priced_at_once():
    policy, replicas = Cost(seed=0, candidates=4), fleet(100, **{f"r{i}": 3 for i in range(100)})
    policy.choose(features_with(4, "warm-up"), replicas)
    joined = [*replicas, view("new", load_age_s=0.1)]
    assert policy.choose(features_with(4, "x"), joined).replica == "new"


def test_a_holder_missing_from_the_views_is_not_chosen():
    policy, replicas = Cost(seed=0, candidates=4), fleet(100)
    first = policy.choose(features_with(10, "x"), replicas)
    policy.on_dispatch(features_with(10, "x"), first)
    without = [v for v in replicas if v.name != first.replica]  # ejected, or tried already (a retry)
    decision = policy.choose(features_with(12, "x"), without)
    assert decision.replica != first.replica and decision.replica in {v.name for v in without}


def test_zero_candidates_prices_every_replica():
    policy, replicas = Cost(seed=0, candidates=0), fleet(200)
    for _ in range(3):
        assert len(policy.choose(features_with(4, "x"), replicas).scores) == 200


def test_between_full_passes_only_the_candidates_views_are_built():
    built: list[str] = []

    class Source:
        def __init__(self, name: str) -> None:
            self.name = name

        def view(self, now: float, stale_after_s: float = 5.0):
            built.append(self.name)
            return view(self.name, load_age_s=0.1)

    sources = [Source(f"r{i}") for i in range(200)]
    policy = Cost(seed=0, candidates=4)
    policy.choose(features_with(4, "warm-up"), LazyViews(sources, now=0.0, stale_after_s=3.0))  # a full pass
    built.clear()
    decision = policy.choose(features_with(4, "x"), LazyViews(sources, now=0.0, stale_after_s=3.0))
    assert decision.replica in built and len(built) <= 2 * 4 + 2


def test_a_widely_held_prompt_prices_k_holders_deepest_first_then_the_least_loaded_of_them():
    # r100..r199 hold 10 blocks of "x" (r150..r152 the least loaded of them), r7 holds 12 under heavy
    # load; r0..r99 are idle and hold nothing, so the fleet's least loaded are not holders.
    loads = {f"r{i}": 5 for i in range(100, 200) if i not in (150, 151, 152)}
    loads.update({"r150": 2, "r151": 2, "r152": 2, "r7": 9})
    policy, replicas = Cost(seed=0, candidates=4), fleet(200, **loads)
    for i in range(100, 200):
        policy.index.add(f"r{i}", features_with(10, "x").block_hashes)
    policy.index.add("r7", features_with(12, "x").block_hashes)
    policy.choose(features_with(4, "warm-up"), replicas)  # the first decision keys the whole fleet
    decision = policy.choose(features_with(12, "x", rid="q"), replicas)
    holders = {name for name in decision.scores if name == "r7" or int(name[1:]) >= 100}
    assert holders == {"r7", "r150", "r151", "r152"}
    assert len(decision.scores) <= 2 * 4


def test_after_the_first_decision_no_decision_prices_the_whole_fleet():
    policy, replicas = Cost(seed=0, candidates=4), fleet(100)
    assert len(policy.choose(features_with(4, "warm-up"), replicas).scores) == 100
    for i in range(300):
        features = features_with(4, f"p{i}", rid=f"q{i}")
        decision = policy.choose(features, replicas)
        assert len(decision.scores) <= 2 * 4
        policy.on_dispatch(features, decision)
        policy.on_complete(features, decision, OK)


def test_load_only_the_engine_saw_reaches_the_order_as_keys_are_re_read_in_turn():
    def busy(running: dict[str, int]) -> list:
        return [view(f"r{i}", running=running.get(f"r{i}", 5), load_age_s=0.1) for i in range(100)]

    policy = Cost(seed=0, candidates=4)
    policy.choose(features_with(4, "warm-up"), busy({}))  # every replica keyed at 5 running
    eased = busy({"r77": 0})  # r77's other traffic ended; nothing was sent there by this router
    chosen = [policy.choose(features_with(4, "x", rid=f"q{i}"), eased).replica
              for i in range(100 // REKEY_PER_DECISION + 1)]
    assert chosen[-1] == "r77"


def test_a_large_fleet_finds_the_holders_the_engines_events_name_even_where_the_index_has_none():
    loads = {f"r{i}": 3 for i in range(200) if i not in (7, 8)}  # r7, r8 idle: the least loaded
    policy, replicas = Cost(seed=0, candidates=4, index="precise"), fleet(200, **loads)
    policy.choose(features_with(4, "warm-up"), replicas)
    features = features_with(41, "x")
    held = {"r150": (40, "synced"), "r7": (0, "synced")}  # r150: busy, but it holds the whole prompt
    request = dataclasses.replace(features, kv_match=FakeMatch(features, held))
    decision = policy.choose(request, replicas)
    assert "r150" in decision.scores and len(decision.scores) <= 2 * 4 + 1
    assert (decision.replica, decision.matched_blocks) == ("r150", 40)


def test_the_least_loaded_are_the_k_lowest_keys_however_stale_the_heap_has_grown():
    # Dispatches and completions move keys and leave superseded heap entries behind; the k least
    # loaded read from the heap are still the k lowest (load / weight, last sent) of the order.
    rng = random.Random(7)
    replicas = fleet(40, **{f"r{i}": rng.randint(0, 5) for i in range(40)})
    filt = CandidateFilter(k=4)
    last: dict[str, int] = {}
    filt.select(replicas, [], last)  # keys the whole fleet
    for step in range(2000):
        name = f"r{rng.randrange(40)}"
        if rng.random() < 0.5:
            last[name] = step
            filt.dispatched(name, step)
        else:
            filt.completed(name)
        if step % 7 == 0:
            chosen = filt.select(replicas, [], last)
            lowest = sorted(filt._key.items(), key=lambda item: (item[1], item[0]))[:4]
            assert [v.name for v in chosen] == [n for n, _ in lowest]


def test_the_least_loaded_stay_the_k_lowest_keys_as_entries_move_between_the_heap_and_the_front(monkeypatch):
    # `_least` keeps the entries it read out of the heap (its sorted front, capped at FRONT_MAX) and
    # merges the two: with keys moved by dispatches, completions and re-read views (load the engines
    # report), and replicas joining, the k read are still the k lowest keys of the order, and the cap's
    # spill back to the heap loses none of them (a cap this low spills often).
    monkeypatch.setattr(candidates, "FRONT_MAX", 10)
    rng = random.Random(12)
    k = 8
    replicas = fleet(60, **{f"r{i}": rng.randint(0, 12) for i in range(60)})
    filt = CandidateFilter(k=k)
    last: dict[str, int] = {}
    filt.select(replicas, [], last)
    longest = 0
    for step in range(4000):
        name = replicas[rng.randrange(len(replicas))].name
        roll = rng.random()
        if roll < 0.4:
            last[name] = step
            filt.dispatched(name, step)
        elif roll < 0.8:
            filt.completed(name)
        elif roll < 0.99:  # a new view: the engine reports more or less than the router's count
            i = next(j for j, v in enumerate(replicas) if v.name == name)
            replicas[i] = dataclasses.replace(replicas[i], running=rng.randint(0, 14), waiting=rng.randint(0, 2))
            filt.seen(replicas[i], last.get(name, -1))
        else:  # a replica joins, idle
            replicas.append(view(f"n{step}", load_age_s=0.1))
        chosen = filt.select(replicas, [], last)
        lowest = sorted(filt._key.items(), key=lambda item: (item[1], item[0]))[:k]
        assert [v.name for v in chosen] == [m for m, _ in lowest]
        longest = max(longest, len(filt._front))
    assert longest == 10  # the cap was reached, and spilled
