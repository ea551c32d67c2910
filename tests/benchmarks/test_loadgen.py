"""The load generator against in-process sim engines: ordering, bounds and failures are kept honest."""

from __future__ import annotations

from benchmarks.lib.fleet import EngineSpec, Fleet
from benchmarks.lib.loadgen import LoadSpec, run_workload
from benchmarks.lib.workloads import Workload, gsp, multiturn


async def test_turns_of_a_session_run_in_order_and_every_request_is_recorded() -> None:
    wl = multiturn(conversations=3, turns=3, system_tokens=16, first_user_tokens=16, user_tokens=4, output_tokens=3)
    async with Fleet(1, EngineSpec(profile="instant"), inprocess=True) as fleet:
        run = await run_workload(fleet.engine_urls[0], wl, LoadSpec(concurrency=3), progress=False)
    assert len(run.records) == 9 and all(r.ok for r in run.records) and run.stopped_by == "done"
    for s in ("c0", "c1", "c2"):
        turns = [r for r in run.records if r.session == s]
        assert [r.turn for r in turns] == [0, 1, 2]
        assert all(a.start_s + a.e2e_s <= b.start_s for a, b in zip(turns, turns[1:], strict=False))
    assert all(r.output_tokens == 3 and r.prompt_tokens > 0 and r.ttft_s is not None for r in run.records)
    assert sum(r.cached_tokens for r in run.records) > 0  # later turns hit the history


async def test_request_count_bound_stops_the_run() -> None:
    wl = gsp(groups=4, questions=4, system_tokens=8, question_tokens=4, output_tokens=2)
    async with Fleet(1, EngineSpec(profile="instant"), inprocess=True) as fleet:
        run = await run_workload(fleet.engine_urls[0], wl, LoadSpec(rate=200.0, max_requests=5), progress=False)
    assert len(run.records) == 5 and run.stopped_by == "count"


async def test_failed_requests_are_recorded_with_their_status() -> None:
    wl: Workload = gsp(groups=1, questions=2, system_tokens=8, question_tokens=4, output_tokens=2)
    async with Fleet(1, EngineSpec(profile="instant"), inprocess=True) as fleet:
        run = await run_workload(fleet.engine_urls[0], wl, LoadSpec(concurrency=1), model="no-such-model",
                                 progress=False)
    assert [r.status for r in run.records] == [404, 404]
    assert all(not r.ok and r.error for r in run.records)


async def test_a_session_header_carries_each_session_id_to_the_router() -> None:
    """`pinned` (consistent_hash on the session header) keeps every conversation on one replica (one client:
    no load bound moves a session to a ring successor)."""
    from benchmarks.lib.fleet import RouterSpec

    wl = multiturn(conversations=8, turns=2, system_tokens=16, first_user_tokens=16, user_tokens=4, output_tokens=2)
    async with Fleet(2, EngineSpec(profile="instant"), RouterSpec("consistent_hash", load_poll_s=0.1),
                     inprocess=True) as fleet:
        assert fleet.router_url is not None
        run = await run_workload(fleet.router_url, wl, LoadSpec(concurrency=1, session_header="x-session-id"),
                                 progress=False)
    assert len(run.records) == 16 and all(r.ok for r in run.records)
    replicas = {s.id: {r.replica for r in run.records if r.session == s.id} for s in wl.sessions}
    assert all(len(r) == 1 and None not in r for r in replicas.values())
    assert len(set.union(*replicas.values())) == 2  # the session ids (fixed hashes) spread them
