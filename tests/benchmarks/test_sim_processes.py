"""K router processes and KV events in the offline simulator (`benchmarks.sim_processes`): one process is
the plain simulator, events announce exactly the engine's cache, and every request returns to its process."""

from __future__ import annotations

import pytest

from benchmarks.lib import workloads as wl
from benchmarks.lib.loadgen import LoadSpec
from benchmarks.sim_loop import simulate
from benchmarks.sim_processes import RouterProcesses


def small(name: str) -> wl.Workload:
    if name == "gsp":
        return wl.gsp(groups=8, questions=6, system_tokens=256, question_tokens=32, output_tokens=8, seed=3)
    if name == "multiturn":
        return wl.multiturn(conversations=6, turns=4, system_tokens=64, first_user_tokens=128, user_tokens=32,
                            output_tokens=8, seed=3)
    return wl.agentic(sessions=8, steps=3, agents=3, prefix_tokens=256, task_tokens=32, tool_output_tokens=32,
                      output_tokens=8, seed=3)


def run(w: wl.Workload, policy: str = "cost", params: dict | None = None, **kw):
    return simulate(w, 4, policy, params or {}, num_blocks=wl.kv_blocks_per_replica(w, 4),
                    load=LoadSpec(concurrency=8, max_requests=w.num_requests, seed=3), seed=5, **kw)


def key(r) -> list[tuple]:
    return [(x.session, x.turn, x.start_s, x.e2e_s, x.ttft_s, x.cached_tokens, x.replica) for x in r.records]


@pytest.fixture
def built(monkeypatch) -> list[RouterProcesses]:
    """Every `RouterProcesses` the simulator builds during the test, to look inside after the run."""
    models: list[RouterProcesses] = []
    init = RouterProcesses.__init__

    def keep(self, *a, **kw):
        init(self, *a, **kw)
        models.append(self)

    monkeypatch.setattr(RouterProcesses, "__init__", keep)
    return models


@pytest.mark.parametrize("name", ["gsp", "multiturn"])
def test_one_process_through_the_model_is_the_plain_simulator(name):
    w = small(name)
    assert key(run(w, router_processes=1, spread="round_robin", kv_events=False)) == key(run(w))
    assert key(run(w, router_processes=1, kv_events=False)) == key(run(w))


@pytest.mark.parametrize("name", ["gsp", "multiturn", "agentic"])
def test_one_process_routes_the_same_with_and_without_agreement(name):
    w = small(name)
    for kv_events in (False, True):
        on = run(w, "cost", {}, router_processes=1, kv_events=kv_events)
        off = run(w, "cost", {"agree": False}, router_processes=1, kv_events=kv_events)
        assert key(on) == key(off)


def test_the_announced_cache_is_the_engines_cache_once_its_steps_are_done(built):
    r = run(small("multiturn"), "precise", router_processes=2, kv_events=True)
    model = built[0]
    assert all(x.ok for x in r.records)
    for cache, eng in zip(model.announced, model.engines, strict=True):
        assert cache.blocks == set(eng.sched.kv._cached)
        assert cache.blocks


def test_requests_spread_over_the_processes_and_every_one_completes_where_it_was_decided(built):
    w = small("gsp")
    r = run(w, "precise", router_processes=4, kv_events=True)
    model = built[0]
    assert len(r.records) == w.num_requests and all(x.ok for x in r.records)
    assert sum(model.sent) == w.num_requests and min(model.sent) > 0
    assert not model._owner  # every completion went back to its process
    assert all(s.in_flight_requests == 0 for states in model.states for s in states)


def test_kv_events_need_the_stepped_engine():
    with pytest.raises(ValueError, match="exact"):
        run(small("gsp"), "precise", kv_events=True, engine="fast")
