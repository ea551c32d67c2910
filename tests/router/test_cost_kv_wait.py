"""cost: the wait for free KV blocks, priced from the engine's load report (docs/policies.md, ``kv_wait``)."""

from policy_fixtures import features_with, view

from router.policies.base import Outcome
from router.policies.cost import Cost

BLOCK = 16  # engine tokens per KV block in these reports (= the fixtures' estimated tokens per block)


def engine(name: str, *, used: int, total: int = 200, running: int = 4, waiting: int = 0,
           load_age_s: float | None = 0.1):
    """A replica with a load report of ``used`` of ``total`` KV blocks held by ``running`` requests (fresh
    unless ``load_age_s`` is None: the view's builder dropped it as stale)."""
    return view(name, running=running, waiting=waiting, in_flight_requests=running + waiting, kv_blocks_used=used,
                kv_blocks_total=total, block_size=BLOCK, load_age_s=load_age_s)


def priced(replica, uncached_blocks: int) -> float:
    """Seconds `cost` charges a fresh policy for ``uncached_blocks`` of prefill on ``replica``."""
    return Cost(seed=0).estimate_cost(replica, uncached_blocks * BLOCK, features_with(40, "x"))


def test_a_replica_whose_free_blocks_cannot_hold_the_request_costs_more_than_one_whose_can():
    short = engine("short", used=190)  # 10 free blocks for 30 uncached ones: wait for running requests to finish
    roomy = engine("roomy", used=100)
    assert priced(short, 30) > priced(roomy, 30)


def test_plenty_of_free_blocks_changes_nothing():
    no_report = view("r", running=4, in_flight_requests=4, load_age_s=0.1)  # no KV geometry reported
    assert priced(engine("r", used=100), 30) == priced(no_report, 30)


def test_the_prompts_waiting_ahead_take_their_blocks_first():
    # 40 free blocks hold this request's 30 but not also three waiting prompts of the same size ahead of it.
    alone, behind_a_queue = engine("r", used=160), engine("r", used=160, waiting=3)
    wait_alone = priced(alone, 30) - priced(engine("r", used=0), 30)
    wait_queued = priced(behind_a_queue, 30) - priced(engine("r", used=0, waiting=3), 30)
    assert wait_alone == 0 and wait_queued > 0


def test_the_wait_grows_with_the_blocks_missing():
    waits = [priced(engine("r", used=used), 30) for used in (170, 180, 190, 200)]
    assert waits == sorted(waits) and len(set(waits)) == 4


def test_a_stale_report_prices_no_wait():
    stale = engine("r", used=199, load_age_s=None)
    assert priced(stale, 30) == priced(view("r", running=4, in_flight_requests=4), 30)


def test_blocks_are_counted_in_the_engine_s_tokens_as_its_reports_show():
    # An engine whose tokenizer makes twice the router's estimate needs twice the blocks: 40 free hold the
    # estimate's 30 blocks but not the engine's 60.
    policy, features = Cost(seed=0), features_with(40, "x")
    for i in range(40):
        request = features_with(40, f"r{i}")
        decision = policy.choose(request, [view("a")])
        policy.on_dispatch(request, decision)
        policy.on_complete(request, decision, Outcome(ok=True, status=200, ttft_s=0.1,
                                                      prompt_tokens=2 * request.token_estimate))
    room_for_estimate = engine("r", used=160)
    assert priced(room_for_estimate, 30) == priced(engine("r", used=0), 30)  # a fresh policy: no wait
    waits = policy.estimate_cost(room_for_estimate, 30 * BLOCK, features)
    assert waits > policy.estimate_cost(engine("r", used=0), 30 * BLOCK, features)


def test_requests_sent_since_the_report_take_blocks_even_when_as_many_reported_ones_finished():
    # The report (running 2 holding 128 of 256 blocks) is a poll old: both reported requests finished since
    # and two 100-block prompts went there. The router's in-flight count equals the reported running, so
    # "in flight beyond running" saw nothing ahead and a third 100-block prompt fit the 128 free blocks;
    # but the engine now holds 200 blocks and 56 are free: the third waits for one of them to finish.
    policy = Cost(seed=0, calibration="pinned", eviction_weight=0.0)
    reported = dict(running=2, waiting=0, kv_blocks_used=128, kv_blocks_total=256, block_size=BLOCK)
    earlier = [features_with(64, f"old{i}", rid=f"old{i}") for i in range(2)]
    for f in earlier:
        policy.on_dispatch(f, policy.choose(f, [view("a", load_age_s=0.4)]))
    decisions = {}
    for f in earlier:  # the report arrives (counting both), then both finish
        decisions[f.request_id] = policy.choose(f, [view("a", in_flight_requests=2, load_age_s=0.0, **reported)])
    for f in earlier:
        policy.on_complete(f, decisions[f.request_id], Outcome(ok=True, status=200, ttft_s=0.1))
    for i in range(2):
        f = features_with(100, f"new{i}", rid=f"new{i}")
        policy.on_dispatch(f, policy.choose(f, [view("a", in_flight_requests=i, load_age_s=0.1, **reported)]))
    now = view("a", in_flight_requests=2, load_age_s=0.2, **reported)
    third = features_with(100, "third", rid="third")
    fresh = Cost(seed=0, calibration="pinned", eviction_weight=0.0)  # no history: nothing sent since
    assert policy.estimate_cost(now, 100 * BLOCK, third) > fresh.estimate_cost(now, 100 * BLOCK, third)
