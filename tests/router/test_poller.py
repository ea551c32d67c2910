"""ReplicaPoller against tiny fake engines (aiohttp test servers with knobs), plus its two parsers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from router.proxy.http1 import UpstreamPool
from router.replicas.health import HealthConfig, HealthTransition
from router.replicas.poller import (
    MAX_GROUPS,
    PROBES_PER_TICK,
    ReplicaPoller,
    parse_load_json,
    parse_vllm_metrics,
)
from router.replicas.state import KV_USAGE_SCALE, ReplicaRegistry, ReplicaState

FAST = {"health_interval_s": 0.05, "load_interval_s": 0.02, "timeout_s": 0.3}

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 400.0
"""
CACHE_CONFIG = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="2000"} 1.0
"""


@dataclass
class Engine:
    """Knobs of one fake engine; ``hits`` counts requests per path."""

    health_status: int = 200
    health_body: str = '{"status": "ok"}'
    has_load: bool = True  # False: /load is 404, like stock `vllm serve`
    load_body: str | None = None  # raw /load body override
    running: int = 3
    draining: bool = False
    models: tuple[str, ...] = ("m",)
    hang: bool = False
    url: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits[request.path] += 1
            if self.hang:
                await self.release.wait()
            if request.path == "/health":
                return web.Response(status=self.health_status, text=self.health_body)
            if request.path == "/load":
                if not self.has_load:
                    raise web.HTTPNotFound()
                if self.load_body is not None:
                    return web.Response(text=self.load_body, content_type="application/json")
                return web.json_response({
                    "num_requests_running": self.running, "num_requests_waiting": 1, "kv_blocks_used": 10,
                    "kv_blocks_total": 100, "block_size": 16, "prefix_cache_queries": 50,
                    "prefix_cache_hits": 20, "draining": self.draining, "in_flight": 4, "model": "m"})
            if request.path == "/metrics":
                return web.Response(text=VLLM_METRICS.replace("} 5.0", "} " + f"{self.running}.0", 1))
            if request.path == "/v1/models":
                return web.json_response({"object": "list", "data": [{"id": m} for m in self.models]})
            raise web.HTTPNotFound()

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def engine(aiohttp_server: Callable[..., Awaitable[object]]) -> AsyncIterator[EngineFactory]:
    started: list[Engine] = []

    async def make(**knobs: object) -> Engine:
        e = Engine(**knobs)  # type: ignore[arg-type]
        server = await aiohttp_server(e.app())
        e.url = str(server.make_url("/"))  # type: ignore[attr-defined]
        started.append(e)
        return e

    yield make
    for e in started:  # let hanging handlers finish so the servers close at once
        e.release.set()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool()
    yield pool
    await pool.close()


@pytest.fixture
async def poller_for(pool: UpstreamPool) -> AsyncIterator[Callable[..., ReplicaPoller]]:
    pollers: list[ReplicaPoller] = []

    def make(registry: ReplicaRegistry, **kw: float) -> ReplicaPoller:
        p = ReplicaPoller(registry, pool, **{**FAST, **kw})
        pollers.append(p)
        return p

    yield make
    for p in pollers:
        await p.stop()


async def eventually(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def dead_url() -> str:
    """A local port with nothing listening (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- the poller --------------------------------------------------------------------------------------


async def test_polls_load_into_a_snapshot(engine: EngineFactory, poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine(running=3)
    r = ReplicaState.create("a", e.url)
    await poller_for(ReplicaRegistry([r])).start()
    await eventually(lambda: r.load is not None)
    assert r.load is not None
    assert (r.load.running, r.load.waiting, r.load.kv_blocks_total, r.load.block_size) == (3, 1, 100, 16)
    assert r.view(time.monotonic()).load_age_s is not None


async def test_falls_back_to_metrics_after_load_404(engine: EngineFactory,
                                                     poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine(has_load=False, running=5)
    r = ReplicaState.create("a", e.url)
    await poller_for(ReplicaRegistry([r])).start()
    await eventually(lambda: e.hits["/metrics"] >= 3)
    assert r.load is not None and (r.load.running, r.load.waiting) == (5, 2)
    assert e.hits["/load"] == 1


async def test_marks_a_dead_replica_unhealthy(poller_for: Callable[..., ReplicaPoller]) -> None:
    r = ReplicaState.create("dead", dead_url())
    await poller_for(ReplicaRegistry([r])).start()
    await eventually(lambda: r.health.state == "ejected")
    assert r.load is None and not r.health.admits(time.monotonic())


async def test_failing_health_endpoint_ejects(engine: EngineFactory,
                                              poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine(health_status=503, health_body='{"error": {"message": "loading"}}')
    r = ReplicaState.create("a", e.url)
    await poller_for(ReplicaRegistry([r])).start()
    await eventually(lambda: r.health.state == "ejected")


async def test_draining_engine_is_not_admitted_nor_ejected(engine: EngineFactory,
                                                           poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine(health_status=503, health_body='{"error": {"message": "draining"}}', draining=True)
    r = ReplicaState.create("a", e.url)
    await poller_for(ReplicaRegistry([r])).start()
    await eventually(lambda: e.hits["/health"] >= 4)
    assert r.health.draining and r.health.state == "healthy" and r.health.ejections == 0
    e.health_status, e.draining = 200, False
    await eventually(lambda: r.health.admits(time.monotonic()))


async def test_hanging_replica_does_not_delay_the_others(engine: EngineFactory,
                                                         poller_for: Callable[..., ReplicaPoller]) -> None:
    stuck = await engine(hang=True)
    fine = await engine()
    a, b = ReplicaState.create("stuck", stuck.url), ReplicaState.create("fine", fine.url)
    await poller_for(ReplicaRegistry([a, b]), timeout_s=0.5).start()
    await asyncio.sleep(0.3)  # well inside one probe timeout of the stuck replica
    assert fine.hits["/load"] >= 5 and fine.hits["/health"] >= 3
    assert stuck.hits["/load"] == 1 and stuck.hits["/health"] == 1  # one probe of each kind outstanding
    await eventually(lambda: a.health.state == "ejected")  # two timed-out checks
    assert b.health.state == "healthy"


async def test_picks_up_added_and_drops_removed_replicas(engine: EngineFactory,
                                                         poller_for: Callable[..., ReplicaPoller]) -> None:
    first, second = await engine(), await engine(running=7)
    registry = ReplicaRegistry([ReplicaState.create("first", first.url)])
    await poller_for(registry).start()
    added = registry.add(ReplicaState.create("second", second.url))
    await eventually(lambda: added.load is not None and added.discovered_models == {"m"})
    assert added.load is not None and added.load.running == 7
    registry.remove("first")
    await asyncio.sleep(0.05)  # let a probe already on the wire land
    before = first.hits.total()
    await asyncio.sleep(0.15)
    assert first.hits.total() == before


async def test_discovers_served_models(engine: EngineFactory, poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine(models=("llama-3-8b",))
    r = ReplicaState.create("a", e.url)
    registry = ReplicaRegistry([r])
    await poller_for(registry).start()
    await eventually(lambda: bool(r.discovered_models))
    assert registry.models(time.monotonic()) == ["llama-3-8b"]
    assert registry.eligible("other-model", time.monotonic()) == []


async def test_bad_answers_do_not_stop_the_loop(engine: EngineFactory,
                                                poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine(load_body="{not json")
    r = ReplicaState.create("a", e.url)
    await poller_for(ReplicaRegistry([r])).start()
    await eventually(lambda: e.hits["/load"] >= 3)
    assert r.load is None
    e.load_body = None
    await eventually(lambda: r.load is not None)


async def test_stop_ends_all_probes_promptly(engine: EngineFactory,
                                             poller_for: Callable[..., ReplicaPoller]) -> None:
    stuck = await engine(hang=True)
    p = poller_for(ReplicaRegistry([ReplicaState.create("stuck", stuck.url)]), timeout_s=30.0)
    await p.start()
    await eventually(lambda: stuck.hits["/health"] == 1)
    t0 = time.monotonic()
    await p.stop()
    # the probe in flight would take its 30 s timeout: stop() cancels it instead (5 s: room for a busy host)
    assert time.monotonic() - t0 < 5.0 and not p.running


async def test_probe_all_warms_every_replica(engine: EngineFactory,
                                             poller_for: Callable[..., ReplicaPoller]) -> None:
    e = await engine()
    r = ReplicaState.create("a", e.url, health=HealthConfig(checks_to_eject=1))
    down = ReplicaState.create("down", dead_url(), health=HealthConfig(checks_to_eject=1))
    await poller_for(ReplicaRegistry([r, down])).probe_all()
    assert r.load is not None and r.discovered_models == {"m"}
    assert down.health.state == "ejected"


def test_poller_hook_is_the_registry_hook(pool: UpstreamPool) -> None:
    def count(replica: ReplicaState, transition: HealthTransition) -> None: ...
    def other(replica: ReplicaState, transition: HealthTransition) -> None: ...

    registry = ReplicaRegistry()
    ReplicaPoller(registry, pool, on_transition=count)
    assert registry.on_transition is count
    with pytest.raises(ValueError):  # two hooks would count every ejection twice
        ReplicaPoller(registry, pool, on_transition=other)


def spread(n: int, pool: UpstreamPool) -> tuple[int, list[list[str]], list[str]]:
    """(groups, the replicas each load tick probes over a first tick and two intervals, all names)."""
    registry = ReplicaRegistry([ReplicaState.create(f"r{i}", f"http://127.0.0.1:{10000 + i}") for i in range(n)])
    poller = ReplicaPoller(registry, pool)
    polled: list[list[str]] = []
    poller._spawn = lambda kind, replica, probe: polled[-1].append(replica.name)  # type: ignore[method-assign]
    groups = poller.groups()
    for group in [-1, *range(groups), *range(groups)]:
        polled.append([])
        poller._load_tick(group, groups)
    return groups, polled, registry.names()


def test_a_large_fleets_probes_are_spread_over_the_interval_each_replica_once(pool: UpstreamPool) -> None:
    groups, (first, *ticks), names = spread(1000, pool)
    assert groups == MAX_GROUPS
    assert sorted(first) == sorted(names)  # the first tick probes everyone
    assert sorted(name for tick in ticks[:groups] for name in tick) == sorted(names)  # then once an interval
    assert ticks[:groups] == ticks[groups:]  # in the same group every interval
    assert max(len(tick) for tick in ticks) <= 2 * 1000 // MAX_GROUPS  # no tick holds a burst of them


def test_a_small_fleet_is_probed_in_one_tick_per_interval(pool: UpstreamPool) -> None:
    groups, polled, names = spread(PROBES_PER_TICK, pool)
    assert groups == 1 and all(sorted(tick) == sorted(names) for tick in polled)


# --- parsers -----------------------------------------------------------------------------------------


def test_metrics_without_cache_config_store_usage_on_the_documented_scale() -> None:
    snap = parse_vllm_metrics(VLLM_METRICS, received_at=1.0)
    assert (snap.running, snap.waiting, snap.prefix_cache_queries, snap.prefix_cache_hits) == (5, 2, 1000, 400)
    assert (snap.kv_blocks_total, snap.block_size, snap.kv_usage) == (KV_USAGE_SCALE, 0, 0.25)


def test_metrics_with_cache_config_give_real_geometry() -> None:
    snap = parse_vllm_metrics(VLLM_METRICS + CACHE_CONFIG, received_at=1.0)
    assert (snap.kv_blocks_used, snap.kv_blocks_total, snap.block_size) == (500, 2000, 16)


def test_metrics_sum_data_parallel_engines() -> None:
    two = VLLM_METRICS + VLLM_METRICS.replace('engine="0"', 'engine="1"').replace("# ", "# x")
    assert parse_vllm_metrics(two, received_at=1.0).running == 10


def test_foreign_metrics_read_as_no_report() -> None:
    with pytest.raises(ValueError):
        parse_vllm_metrics("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n", 1.0)


def test_load_json_parses_engine_report() -> None:
    snap = parse_load_json({"num_requests_running": 2, "num_requests_waiting": 1, "kv_blocks_used": 5,
                            "kv_blocks_total": 50, "block_size": 16, "prefix_cache_queries": 9,
                            "prefix_cache_hits": 3}, received_at=2.0)
    assert snap.kv_usage == 0.1 and snap.received_at == 2.0
    with pytest.raises(ValueError):
        parse_load_json({"status": "ok"}, received_at=2.0)


def test_the_engines_concurrency_limit_reaches_the_policys_view() -> None:
    from engine_server.sim.backend import SimBackend, SimConfig

    report = SimBackend(SimConfig(profile="tiny-seqs", num_blocks=64)).load_report().to_json()
    assert report["max_num_seqs"] == 4
    replica = ReplicaState.create("a", "http://a")
    replica.load = parse_load_json(report, received_at=1.0)
    assert replica.view(now=100.0).max_num_seqs == 4  # static: kept after the report goes stale
    assert parse_load_json({"num_requests_running": 0}, received_at=1.0).max_num_seqs == 0  # unknown
