"""Router processes agree where a prompt the cache does not place goes (`router.policies.placement`), and a
lone router decides exactly as before. Each "process" is its own `Cost` instance with its own view."""

from __future__ import annotations

import dataclasses
import random

import pytest
from policy_fixtures import prompt, reported, request, views

from router.calibration import CostConstants
from router.features import RequestFeatures
from router.policies import placement
from router.policies.base import Outcome
from router.policies.cost import Cost

REPLICAS = ("a", "b", "c", "d")


def burst(n: int, group: str = "g") -> list[RequestFeatures]:
    """``n`` requests sharing a new 24-block system prompt, each with its own question."""
    shared = prompt(group, 24)
    return [request(shared + f"question {i}: ".ljust(128, "."), rid=f"{group}-{i}") for i in range(n)]


def test_four_processes_told_of_each_other_send_a_new_prefix_burst_to_one_replica():
    processes = [Cost(seed=k, index="precise", router_processes=4) for k in range(4)]
    picks = {p.choose(f, views(*REPLICAS)).replica for p, f in zip(processes, burst(4), strict=True)}
    assert len(picks) == 1


def test_without_agreement_the_same_burst_scatters():
    processes = [Cost(seed=k, index="precise", router_processes=4, agree=False) for k in range(4)]
    picks = {p.choose(f, views(*REPLICAS)).replica for p, f in zip(processes, burst(4), strict=True)}
    assert len(picks) > 1


def test_different_new_prefixes_spread_over_the_replicas():
    p = Cost(seed=0, router_processes=4)
    picks = {p.choose(burst(1, group=f"g{i}")[0], views(*REPLICAS)).replica for i in range(32)}
    assert picks == set(REPLICAS)


def test_a_prompt_that_a_replica_holds_is_priced_not_placed():
    p = Cost(seed=0, router_processes=4)
    first = burst(2)
    d = p.choose(first[0], views(*REPLICAS))
    p.on_dispatch(first[0], d)
    p.on_complete(first[0], d, Outcome(ok=True, status=200, ttft_s=0.1))
    second = p.choose(first[1], views(*REPLICAS))
    assert (second.replica, second.reason) == (d.replica, "prefix")


def test_agree_needs_other_processes_and_leaves_a_cheapest_holder_to_the_costs():
    f = burst(1)[0]
    idle = views(*REPLICAS)
    costs = dict.fromkeys(REPLICAS, 1.0)
    one_second = lambda common: 1.0  # noqa: E731
    assert placement.agree(f.block_hashes, f.block_tokens, idle, costs, {}, one_second, processes=1) is None
    assert placement.agree(f.block_hashes, f.block_tokens, idle, costs, {}, one_second, processes=2) is not None
    assert placement.agree(f.block_hashes, f.block_tokens, idle, costs, {"a": 3}, one_second, processes=2) is None


def test_one_process_decides_exactly_as_without_agreement():
    """router_processes=1 and engine reports that never exceed the router's own requests: 200 seeded
    decisions (with feedback) are the same with the option on and off."""
    for index in ("auto", "approximate"):
        on, off = Cost(seed=3, index=index), Cost(seed=3, index=index, agree=False)
        rng = random.Random(7)
        for i in range(200):
            f = request(prompt(f"t{rng.randrange(12)}", rng.randrange(1, 30)), rid=f"q{i}")
            replicas = []
            for n in REPLICAS:
                own = rng.randrange(4)
                running = rng.randrange(own + 1)
                replicas.append(dataclasses.replace(
                    reported(n, running=running, waiting=rng.randrange(own - running + 1), report_age_s=0.2),
                    in_flight_requests=own, in_flight_tokens=rng.randrange(3000)))
            a, b = on.choose(f, replicas), off.choose(f, replicas)
            assert a == b
            done = rng.random() < 0.7
            outcome = Outcome(ok=True, status=200, ttft_s=0.1, prompt_tokens=100, cached_tokens=rng.randrange(100),
                              completion_tokens=20)
            for p in (on, off):
                p.on_dispatch(f, a)
                if done:
                    p.on_complete(f, a, outcome)


def test_router_processes_below_one_is_rejected():
    with pytest.raises(ValueError, match="router_processes"):
        Cost(router_processes=0)



def test_the_margin_is_priced_in_the_calibrated_units_of_the_costs_it_is_compared_with():
    """A fleet learned to be 10x slower than the configured prior decides as a fleet configured 10x slower:
    every cost scales by 10, and so does the margin (the prompt's own prefill on the cheapest replica), so
    a replica with one short prompt queued stays among the near-cheapest that agreement picks from."""
    prior = CostConstants(2e-3, 2e-5, 1e-5, 6e-3)
    slow = CostConstants(*(10 * c for c in prior.as_tuple()))
    learned = Cost(seed=0, router_processes=4, calibration="pinned")
    learned.calibrator.constants = lambda name: slow  # type: ignore[method-assign]
    configured = Cost(seed=0, router_processes=4, calibration="pinned", request_overhead_s=slow.request_overhead_s,
                      prefill_s_per_token=slow.prefill_s_per_token, decode_s_per_seq=slow.decode_s_per_seq,
                      decode_step_s=slow.decode_step_s)
    picks = []
    for i in range(32):  # "a" has one prompt of 10-72 tokens queued: costlier, but by less than a prefill
        f = burst(1, group=f"g{i}")[0]
        loaded = [dataclasses.replace(v, in_flight_requests=1, in_flight_tokens=10 + 2 * i) if v.name == "a" else v
                  for v in views(*REPLICAS)]
        a, b = learned.choose(f, loaded), configured.choose(f, loaded)
        assert (a.replica, a.scores) == (b.replica, pytest.approx(b.scores))
        picks.append(a.replica)
    assert set(picks) == set(REPLICAS)  # "a" is within the margin for the prefixes that rank it first


def test_a_holder_within_the_unseen_load_of_the_cheapest_keeps_its_prefix():
    """Costs closer than the load this process cannot see do not tell replicas apart; the cache does: a
    replica holding the prompt a little dearer than an empty one keeps it (four processes: the margin is
    3/4 of the prompt's own prefill)."""
    f = burst(1)[0]
    costs = {"a": 1.05, "b": 1.0, "c": 1.0, "d": 1.2}
    one_second = lambda common: 1.0  # noqa: E731
    pick = placement.agree(f.block_hashes, f.block_tokens, views(*REPLICAS), costs, {"a": 8}, one_second, 4)
    assert pick is not None and pick.name == "a"


def test_a_holder_dearer_than_the_margin_is_left_to_the_costs():
    f = burst(1)[0]
    costs = {"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.2}
    one_second = lambda common: 1.0  # noqa: E731
    assert placement.agree(f.block_hashes, f.block_tokens, views(*REPLICAS), costs, {"a": 8}, one_second, 4) is None


def test_when_the_cheapest_holds_the_deepest_match_the_costs_decide():
    f = burst(1)[0]
    costs = {"a": 1.05, "b": 1.0, "c": 1.0, "d": 1.2}
    one_second = lambda common: 1.0  # noqa: E731
    held = {"a": 8, "b": 8}
    assert placement.agree(f.block_hashes, f.block_tokens, views(*REPLICAS), costs, held, one_second, 4) is None


def test_among_near_holders_the_deepest_match_wins_then_the_cheaper():
    f = burst(1)[0]
    costs = {"a": 1.1, "b": 1.0, "c": 1.05, "d": 1.08}
    one_second = lambda common: 1.0  # noqa: E731
    held = {"a": 8, "c": 8, "d": 4}
    pick = placement.agree(f.block_hashes, f.block_tokens, views(*REPLICAS), costs, held, one_second, 4)
    assert pick is not None and pick.name == "c"
