"""ReplicaState, its lease and view, and the registry's eligibility rules."""

from __future__ import annotations

import asyncio

import pytest

from config.router import LoadSettings
from router.replicas.health import HealthConfig, HealthTransition
from router.replicas.state import KV_USAGE_SCALE, LoadSnapshot, ReplicaRegistry, ReplicaState


def replica(name: str = "a", models: tuple[str, ...] = (), **kw: object) -> ReplicaState:
    return ReplicaState.create(name, f"http://{name}.local:8000/", models=models, **kw)  # type: ignore[arg-type]


def snapshot(received_at: float, running: int = 4) -> LoadSnapshot:
    return LoadSnapshot(running=running, waiting=2, kv_blocks_used=30, kv_blocks_total=100, block_size=16,
                        prefix_cache_queries=1000, prefix_cache_hits=600, received_at=received_at)


def eject(r: ReplicaState, now: float = 0.0) -> None:
    for _ in range(r.health.config.failures_to_eject):
        r.health.record_failure(now, "connect")
    assert r.health.state == "ejected"


# --- lease -------------------------------------------------------------------------------------------


def test_lease_counts_while_held_and_releases_on_exit() -> None:
    r = replica()
    with r.lease(100, now=0.0):
        assert (r.in_flight_requests, r.in_flight_tokens) == (1, 100)
    assert (r.in_flight_requests, r.in_flight_tokens) == (0, 0)


def test_lease_releases_on_exception() -> None:
    r = replica()
    with pytest.raises(RuntimeError), r.lease(50, now=0.0):
        raise RuntimeError("upstream broke")
    assert (r.in_flight_requests, r.in_flight_tokens) == (0, 0)


async def test_lease_releases_on_cancellation() -> None:
    r = replica()
    entered = asyncio.Event()

    async def stream() -> None:
        with r.lease(50):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(stream())
    await entered.wait()
    assert r.in_flight_requests == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (r.in_flight_requests, r.in_flight_tokens) == (0, 0)


def test_release_is_idempotent() -> None:
    r = replica()
    lease = r.lease(10, now=0.0)
    lease.release()
    lease.release()
    with lease:
        pass
    assert (r.in_flight_requests, r.in_flight_tokens) == (0, 0)


def test_first_token_stops_counting_the_prompt() -> None:
    r = replica()
    with r.lease(100, now=0.0) as lease:
        lease.first_token()
        lease.first_token()
        assert (r.in_flight_requests, r.in_flight_tokens) == (1, 0)
    assert (r.in_flight_requests, r.in_flight_tokens) == (0, 0)


def test_lease_on_half_open_replica_claims_the_trial() -> None:
    r = replica()
    eject(r)
    with r.lease(10, now=5.0) as lease:
        assert lease.trial and not r.health.admits(5.0)
        lease.record_failure("status", now=5.1)
    assert r.health.state == "ejected" and r.health.ejections == 2


def test_trial_lease_released_without_verdict_frees_the_slot() -> None:
    r = replica()
    eject(r)
    with r.lease(10, now=5.0):
        pass  # the client went away before the replica answered
    assert r.health.state == "half_open" and r.health.admits(5.1)


# --- view --------------------------------------------------------------------------------------------


def test_view_of_fresh_load_carries_the_report() -> None:
    r = replica(weight=2.0)
    r.load = snapshot(received_at=10.0)
    with r.lease(64, now=10.0):
        v = r.view(now=11.0, stale_after_s=5.0)
    assert (v.name, v.url, v.weight, v.healthy) == ("a", "http://a.local:8000", 2.0, True)
    assert (v.in_flight_requests, v.in_flight_tokens) == (1, 64)
    assert (v.running, v.waiting, v.kv_blocks_used, v.kv_blocks_total, v.block_size) == (4, 2, 30, 100, 16)
    assert v.load_age_s == pytest.approx(1.0)


def test_stale_load_reads_as_missing_not_as_zero_load() -> None:
    r = replica()
    r.load = snapshot(received_at=10.0, running=0)
    v = r.view(now=15.1, stale_after_s=5.0)
    assert v.load_age_s is None and not v.engine_fresh()
    assert (v.running, v.waiting, v.kv_blocks_used) == (0, 0, 0)
    assert (v.kv_blocks_total, v.block_size) == (100, 16)  # geometry is static, kept at any age


def test_stale_usage_only_report_leaves_no_kv_numbers() -> None:
    r = replica()
    r.load = LoadSnapshot(running=1, waiting=0, kv_blocks_used=0, kv_blocks_total=KV_USAGE_SCALE, block_size=0,
                          prefix_cache_queries=0, prefix_cache_hits=0, received_at=0.0)
    v = r.view(now=10.0, stale_after_s=5.0)
    assert (v.kv_blocks_total, v.kv_blocks_used, v.load_age_s) == (0, 0, None)


def test_without_a_stale_after_s_a_view_judges_freshness_as_the_router_config_does() -> None:
    r = replica()
    r.load = snapshot(received_at=0.0)
    limit = LoadSettings().stale_after_s
    assert r.view(now=limit).load_age_s == limit
    assert r.view(now=limit + 0.01).load_age_s is None


def test_requests_in_flight_when_a_report_came_and_finished_since_are_counted_in_the_view() -> None:
    # the report may still count them as running; the engine's running is a poll old
    r = replica()
    before, spanning = r.lease(10, now=1.0), r.lease(10, now=2.0)
    before.release(now=2.5)  # finished before the report: the report does not count it
    r.load = snapshot(received_at=3.0)
    after = r.lease(10, now=3.5)  # sent after the report: the report does not count it either
    spanning.release(now=4.0)
    after.release(now=4.5)
    assert r.view(now=5.0).finished_since_report == 1


def test_a_new_report_restarts_the_count_of_finished_requests() -> None:
    r = replica()
    r.load = snapshot(received_at=1.0)
    r.lease(10, now=0.5).release(now=2.0)
    assert r.view(now=2.5).finished_since_report == 1
    r.load = snapshot(received_at=3.0)
    assert r.view(now=3.5).finished_since_report == 0


def test_a_stale_report_carries_no_count_of_finished_requests() -> None:
    r = replica()
    r.load = snapshot(received_at=1.0)
    r.lease(10, now=0.5).release(now=2.0)
    assert r.view(now=10.0, stale_after_s=5.0).finished_since_report == 0


def test_view_without_any_report_has_no_age() -> None:
    assert replica().view(now=0.0).load_age_s is None


def test_view_marks_an_ejected_replica_unhealthy() -> None:
    r = replica()
    eject(r)
    assert not r.view(now=1.0).healthy


def test_usage_totals_give_the_observed_hit_rate() -> None:
    r = replica()
    assert r.cache_hit_rate is None
    r.record_usage(100, 75)
    r.record_usage(100, None)
    assert (r.prompt_tokens_total, r.cached_tokens_total, r.cache_hit_rate) == (200, 75, 0.375)


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["a.local:8000", "ftp://a.local", "http://", "/v1"])
def test_replica_url_must_be_http(url: str) -> None:
    with pytest.raises(ValueError):
        ReplicaState.create("a", url)


def test_replica_weight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplicaState.create("a", "http://a.local", weight=0)


def test_registry_rejects_duplicate_names() -> None:
    reg = ReplicaRegistry([replica("a")])
    with pytest.raises(ValueError):
        reg.add(ReplicaState.create("a", "http://other.local"))


# --- registry ----------------------------------------------------------------------------------------


def test_eligible_filters_by_model_and_unknown_serves_any() -> None:
    configured = replica("configured", models=("llama",))
    discovered = replica("discovered")
    discovered.discovered_models = frozenset({"qwen"})
    bare = replica("bare")
    reg = ReplicaRegistry([configured, discovered, bare])
    assert [r.name for r in reg.eligible("llama", 0.0)] == ["configured", "bare"]
    assert [r.name for r in reg.eligible("qwen", 0.0)] == ["discovered", "bare"]
    assert [r.name for r in reg.eligible(None, 0.0)] == ["configured", "discovered", "bare"]


def test_eligible_follows_models_discovered_and_members_added_after_it_was_asked() -> None:
    a, b = replica("a", models=("llama",)), replica("b", models=("qwen",))
    reg = ReplicaRegistry([a, b])
    assert [r.name for r in reg.eligible("llama", 0.0)] == ["a"]
    b.discovered_models = frozenset({"llama"})
    assert [r.name for r in reg.eligible("llama", 0.0)] == ["a", "b"]
    reg.add(replica("c", models=("llama",)))
    reg.remove("a")
    assert [r.name for r in reg.eligible("llama", 0.0)] == ["b", "c"]
    a.discovered_models = frozenset({"qwen"})  # a member no more: its changes reach nobody
    assert [r.name for r in reg.eligible("qwen", 0.0)] == ["b"]


def test_eligible_rechecks_health_on_every_call() -> None:
    a, b = replica("a"), replica("b")
    reg = ReplicaRegistry([a, b])
    assert [r.name for r in reg.eligible(None, 1.0)] == ["a", "b"]
    a.health.set_draining(True)
    assert [r.name for r in reg.eligible(None, 1.0)] == ["b"]
    a.health.set_draining(False)
    eject(b)
    assert [r.name for r in reg.eligible(None, 1.0)] == ["a"]


def test_eligible_excludes_ejected_and_draining_replicas() -> None:
    ejected, draining, ok = replica("ejected"), replica("draining"), replica("ok")
    eject(ejected)
    draining.health.set_draining(True)
    reg = ReplicaRegistry([ejected, draining, ok])
    assert [r.name for r in reg.eligible(None, 1.0)] == ["ok"]
    assert [v.name for v in reg.views(None, 1.0)] == ["ok"]


def test_eligible_readmits_after_an_ejection_runs_out_and_lets_the_doubling_decay() -> None:
    back = replica("back")
    reg = ReplicaRegistry([back])
    eject(back)
    until = back.health.ejected_until
    assert reg.eligible(None, until - 0.001) == []
    assert reg.eligible(None, until) == [back] and back.health.state == "half_open"
    back.health.record_success(until)  # the trial succeeded: healthy, the next ejection still doubled
    assert back.health.level > 0 and reg.eligible(None, until + 1.0) == [back]
    assert reg.eligible(None, until + back.health.config.decay_s) == [back] and back.health.level == 0


def test_models_lists_the_union_of_available_replicas() -> None:
    a = replica("a", models=("m2",))
    a.discovered_models = frozenset({"m1"})
    b = replica("b", models=("m3",))
    down = replica("down", models=("m4",))
    eject(down)
    reg = ReplicaRegistry([a, b, down])
    assert reg.models(now=1.0) == ["m1", "m2", "m3"]


def test_remove_returns_the_state_and_stops_routing_to_it() -> None:
    reg = ReplicaRegistry([replica("a"), replica("b")])
    removed = reg.remove("a")
    assert removed.name == "a" and reg.names() == ["b"] and "a" not in reg
    assert [r.name for r in reg.eligible(None, 0.0)] == ["b"]
    with pytest.raises(KeyError):
        reg.remove("a")


def test_registry_hook_sees_transitions_from_any_source_until_removed() -> None:
    seen: list[tuple[str, HealthTransition]] = []
    r = replica("a", health=HealthConfig(failures_to_eject=1))
    reg = ReplicaRegistry([r], on_transition=lambda rep, t: seen.append((rep.name, t)))
    with r.lease(1, now=0.0) as lease:
        lease.record_failure("connect", now=0.0)
    assert [(name, t.new) for name, t in seen] == [("a", "ejected")]
    reg.remove("a")
    r.health.admits(100.0)  # would turn half-open; nobody is listening any more
    assert len(seen) == 1


def test_a_failing_hook_does_not_break_health_tracking() -> None:
    def boom(_r: ReplicaState, _t: HealthTransition) -> None:
        raise RuntimeError("metrics down")

    r = replica("a", health=HealthConfig(failures_to_eject=1))
    ReplicaRegistry([r], on_transition=boom)
    r.health.record_failure(0.0, "connect")
    assert r.health.state == "ejected"


def test_a_hook_with_the_wrong_arity_is_refused_up_front() -> None:
    with pytest.raises(TypeError, match="on_transition must accept"):
        ReplicaRegistry(on_transition=lambda name, old, new: None)
