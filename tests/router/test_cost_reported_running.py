"""cost: an engine's reported ``running`` is a poll old; requests of ours that finished since the report
came (``ReplicaView.finished_since_report``, counted by the replica's leases) no longer run."""

from collections import Counter

from policy_fixtures import features_with, request, view

from router.policies.base import Outcome
from router.policies.cost import Cost

OK = Outcome(ok=True, status=200, ttft_s=0.05, completion_tokens=16)
SYSTEM = "You are a helpful assistant. " + "s" * 800  # shared by every conversation's first turn


def served_one_request(policy: Cost, replica: str) -> None:
    """A short request goes to ``replica`` (idle, its report fresh) and finishes."""
    f = features_with(2, "warm-up", rid="warm-up")
    decision = policy.choose(f, [view(replica, load_age_s=0.1)])
    policy.on_dispatch(f, decision)
    policy.on_complete(f, decision, OK)


def test_a_report_taken_while_our_request_ran_and_read_after_it_finished_prices_the_replica_idle():
    policy = Cost(seed=0, calibration="pinned")
    served_one_request(policy, "a")
    ghost = view("a", running=1, load_age_s=0.3, finished_since_report=1)  # still counts the finished one
    idle = view("b", load_age_s=0.3)
    f = features_with(20, "next")
    assert policy.estimate_cost(ghost, 320, f) == policy.estimate_cost(idle, 320, f)


def test_a_request_of_ours_that_finished_before_the_report_came_is_not_taken_off_it():
    # the report was taken after it finished: the one it counts runs for someone else (another router)
    policy = Cost(seed=0, calibration="pinned")
    served_one_request(policy, "a")
    other = view("a", running=1, load_age_s=0.3)  # finished_since_report 0: nothing of ours ran through it
    f = features_with(20, "next")
    assert policy.estimate_cost(other, 320, f) > policy.estimate_cost(view("b", load_age_s=0.3), 320, f)


def test_requests_the_engine_runs_for_others_still_count():
    policy = Cost(seed=0, calibration="pinned")
    served_one_request(policy, "a")
    busy = view("a", running=3, load_age_s=0.3, finished_since_report=1)  # one was ours: two others run
    f = features_with(20, "next")
    two_others = view("b", running=2, load_age_s=0.3)
    assert policy.estimate_cost(busy, 320, f) == Cost(seed=0, calibration="pinned").estimate_cost(two_others, 320, f)


def test_a_burst_of_first_turns_spreads_evenly_after_a_warm_up_request_finished():
    # Live (benchmarks.compare, multiturn): a warm-up request finished on r2 but r2's report still said
    # running 1 when eight conversations started at once; priced as decoding, r2 got one of them, others 3.
    policy = Cost(seed=0, calibration="pinned")
    served_one_request(policy, "r2")
    in_flight: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    went = []
    for c in range(8):
        f = request(SYSTEM + f" conversation {c}: " + "u" * 1600, rid=f"c{c}")
        fleet = [view(r, running=int(r == "r2"), load_age_s=0.35, in_flight_requests=in_flight[r],
                      in_flight_tokens=tokens[r], finished_since_report=int(r == "r2"))
                 for r in ("r0", "r1", "r2", "r3")]
        decision = policy.choose(f, fleet)
        policy.on_dispatch(f, decision)
        in_flight[decision.replica] += 1  # none has finished its prefill yet: the burst arrives at once
        tokens[decision.replica] += f.token_estimate
        went.append(decision.replica)
    assert sorted(Counter(went).values()) == [2, 2, 2, 2]


def test_with_several_router_processes_our_finished_requests_stand_for_all_processes_finished_ones():
    # requests reach the processes at random: one of ours finished since the report stands for N
    policy = Cost(seed=0, calibration="pinned", router_processes=2)
    report = view("a", running=3, load_age_s=0.3, finished_since_report=1)  # 3 - 1 x 2 still run
    f = features_with(20, "next")
    alone = Cost(seed=0, calibration="pinned", router_processes=2)
    assert policy.estimate_cost(report, 320, f) == alone.estimate_cost(view("b", running=1, load_age_s=0.3), 320, f)
