"""Dispatch under failure: retries and giving up, the retry budget, long non-streamed answers, clients
that leave before the headers, request ids, and metric labels clients cannot mint."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.router import parse_config
from router.app import ROUTER, create_app
from router.proxy.retry_budget import RetryBudget
from tests.conftest import SimServerFactory

COMPLETION = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}


@dataclass
class FakeEngine:
    """An engine that answers every generation request with `status` (+ Retry-After) and counts them."""

    status: int = 503
    retry_after: str | None = None
    calls: int = 0
    request_ids: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def generate(request: web.Request) -> web.Response:
            self.calls += 1
            self.request_ids.append(request.headers.get("X-Request-Id", ""))
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": {"message": "busy", "type": "server_error", "param": None,
                                                "code": self.status}}, status=self.status, headers=headers)

        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "sim-model", "object": "model"}]})

        app = web.Application()
        app.router.add_post("/v1/completions", generate)
        app.router.add_post("/v1/chat/completions", generate)
        app.router.add_get("/health", ok)
        app.router.add_get("/v1/models", models)
        return app


Start = Callable[..., Awaitable[TestServer]]


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def start_router(servers: Any, engines: list[TestServer], **cfg: Any) -> TestServer:
    config = parse_config({"replicas": [{"name": f"r{i}", "url": url(e), "models": ["sim-model"]}
                                        for i, e in enumerate(engines)],
                           "health": {"check_interval_s": 0.2}, **cfg})
    return await servers(create_app(config))


async def test_failing_replicas_are_retried_on_others_then_the_last_answer_is_passed_on(servers: Any) -> None:
    fakes = [FakeEngine(status=503), FakeEngine(status=503), FakeEngine(status=503)]
    engines = [await servers(f.app()) for f in fakes]
    router = await start_router(servers, engines, retry={"max_attempts": 3}, policy={"name": "round_robin"})
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/completions"), json=COMPLETION) as r:
        assert r.status == 503
        assert (await r.json())["error"]["message"] == "busy"
    assert sorted(f.calls for f in fakes) == [1, 1, 1]  # one attempt on each replica, none twice


async def test_the_retry_budget_holds_total_attempts_near_the_request_count(servers: Any) -> None:
    fakes = [FakeEngine(status=503) for _ in range(3)]
    engines = [await servers(f.app()) for f in fakes]
    router = await start_router(servers, engines, retry={"max_attempts": 3, "budget_ratio": 0.2,
                                                         "budget_min_retries": 2, "budget_window_s": 600},
                                health={"failures_to_eject": 1000})
    n = 50
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.post(router.make_url("/v1/completions"), json=COMPLETION) as r:
                assert r.status == 503
    attempts = sum(f.calls for f in fakes)
    assert n < attempts <= n + 2 + 0.2 * n  # without the budget: 3 x 50 = 150


async def test_a_429_passes_the_engines_retry_after_on_to_the_client(servers: Any) -> None:
    fake = FakeEngine(status=429, retry_after="7")
    router = await start_router(servers, [await servers(fake.app())])
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/completions"), json=COMPLETION) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "7"


def test_retry_budget_allows_the_floor_plus_a_share_of_requests_in_the_window() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.2, min_retries=1, window_s=10, clock=lambda: now[0])
    for _ in range(10):
        budget.on_request()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]  # 1 + 0.2 x 10
    now[0] = 11.0  # the window moved on: old requests and retries no longer count
    assert budget.counts == (0, 0)
    assert budget.try_retry() and not budget.try_retry()


async def test_a_long_non_streamed_answer_is_bounded_by_total_s_not_first_byte_s(
        sim_server: SimServerFactory, servers: Any) -> None:
    engines = [await sim_server(faults={"added_latency_s": 1.0}) for _ in range(2)]
    router = await start_router(servers, engines, timeouts={"first_byte_s": 0.2, "total_s": 30})
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/completions"), json=COMPLETION) as r:
        assert r.status == 200, await r.text()


async def test_a_non_streamed_deadline_is_not_retried_and_ejects_no_replica(
        sim_server: SimServerFactory, servers: Any) -> None:
    engines = [await sim_server(faults={"added_latency_s": 1.0}) for _ in range(2)]
    router = await start_router(servers, engines, timeouts={"total_s": 0.2}, health={"failures_to_eject": 1})
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(router.make_url("/v1/completions"), json=COMPLETION) as r:
                assert r.status == 504
        metrics = await (await s.get(router.make_url("/metrics"))).text()
    state = router.app[ROUTER]
    assert all(r.health.state == "healthy" for r in state.registry.all())
    assert "router_retries_total{" not in metrics


async def test_an_outcome_is_reported_when_the_client_leaves_before_the_headers(
        sim_server: SimServerFactory, servers: Any) -> None:
    engine = await sim_server(faults={"added_latency_s": 5.0})  # no headers for 5 s
    router = await start_router(servers, [engine], policy={"name": "cost"})
    state = router.app[ROUTER]
    replica = state.registry.get("r0")
    policy = state.dispatcher.policy  # type: ignore[union-attr]
    assert replica is not None
    async with aiohttp.ClientSession() as s:
        client = asyncio.ensure_future(s.post(router.make_url("/v1/completions"), json=COMPLETION))
        async with asyncio.timeout(30):  # hang guards only
            while replica.in_flight_requests == 0:  # dispatched: the request waits for the engine
                await asyncio.sleep(0.01)
            assert policy._inflight["r0"].count == 1
            client.cancel()  # the client leaves before any response header
            while replica.in_flight_requests or policy._inflight["r0"].count:
                await asyncio.sleep(0.01)
    metrics = state.metrics.render().decode()
    assert 'router_requests_total{model="sim-model",replica="r0",status="499"} 1.0' in metrics


async def test_clients_sharing_a_request_id_do_not_collide_upstream(servers: Any) -> None:
    fake = FakeEngine(status=400)
    router = await start_router(servers, [await servers(fake.app())])
    async with aiohttp.ClientSession() as s:
        async def one() -> list[str]:
            async with s.post(router.make_url("/v1/completions"), json=COMPLETION,
                              headers={"X-Request-Id": "same"}) as r:
                return r.headers.getall("X-Request-Id")
        echoed = await asyncio.gather(*[one() for _ in range(6)])
    assert echoed == [["same"]] * 6  # once each, the client's own
    assert len(set(fake.request_ids)) == 6 and all(i.startswith("same-") for i in fake.request_ids)


async def test_client_chosen_model_names_never_become_metric_labels(sim_server: SimServerFactory,
                                                                    servers: Any) -> None:
    router = await start_router(servers, [await sim_server()])
    state = router.app[ROUTER]
    for r in state.registry.all():  # a drained fleet: the router cannot refuse unknown models with 404
        r.health.set_draining(True, source="test")
    bodies = [json.dumps({"model": f"model-{i}", "prompt": "x", "max_tokens": 1}) for i in range(20)]
    bodies.append('{"model": "\\udc80", "prompt": "x", "max_tokens": 1}')  # a lone surrogate escape
    async with aiohttp.ClientSession() as s:
        for body in bodies:
            async with s.post(router.make_url("/v1/completions"), data=body,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status < 500 or r.status == 503  # 503: no replica admitted
        async with s.get(router.make_url("/metrics")) as r:
            assert r.status == 200
            text = await r.text()
    assert "model-1" not in text
    assert 'router_requests_total{model="unknown",replica="none",status="503"} 20.0' in text
    state.registry.get("r0").discovered_models = frozenset({"\udc80", "sim-model"})  # a hostile engine
    assert state.dispatcher.model_label("\udc80") == "unknown"  # type: ignore[union-attr]
    assert state.dispatcher.model_label("sim-model") == "sim-model"  # type: ignore[union-attr]


async def test_probes_do_not_keep_the_request_pool_warm(sim_server: SimServerFactory, servers: Any) -> None:
    # Probes sharing the request pool would keep a past burst's idle connections in use (a pool that
    # reuses the longest-idle first, as aiohttp's, touches each in turn), so none would time out.
    router = await start_router(servers, [await sim_server()])
    state = router.app[ROUTER]
    assert state.poller is not None and state.dispatcher is not None
    assert state.poller.pool is not state.dispatcher.pool
    assert state.poller.pool.max_idle_per_origin <= 4
