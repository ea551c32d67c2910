"""The router end to end, in front of four sim engine servers on loopback ports."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from config.router import parse_config
from engine_server.app import STATE
from router.app import ROUTER, create_app
from tests.conftest import SimServerFactory, free_port

SYSTEM = "You are the support assistant of the Acme rocket company. Answer precisely. " * 12
RouterFactory = Callable[..., Awaitable[tuple[TestServer, list[TestServer]]]]



@pytest.fixture
async def fleet(sim_server: SimServerFactory) -> AsyncIterator[RouterFactory]:
    routers: list[TestServer] = []

    async def start(n: int = 4, policy: str = "cost", dead: int = 0, router_cfg: dict[str, Any] | None = None,
                    **sim: Any) -> tuple[TestServer, list[TestServer]]:
        engines = [await sim_server(**sim) for _ in range(n)]
        replicas = [{"name": f"r{i}", "url": str(e.make_url("")).rstrip("/")} for i, e in enumerate(engines)]
        replicas += [{"name": f"dead{i}", "url": f"http://127.0.0.1:{free_port()}"} for i in range(dead)]
        cfg = parse_config({"replicas": replicas, "policy": {"name": policy},
                            "health": {"check_interval_s": 0.2}, "load": {"poll_interval_s": 0.1},
                            **(router_cfg or {})})
        server = TestServer(create_app(cfg), host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        routers.append(server)
        return server, engines

    yield start
    for r in routers:
        await r.close()


def chat(system: str, user: str, **kw: Any) -> dict[str, Any]:
    return {"model": "sim-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}], **kw}


async def call(session: aiohttp.ClientSession, router: TestServer, body: dict[str, Any],
               path: str = "/v1/chat/completions") -> tuple[int, dict[str, Any], str | None]:
    async with session.post(router.make_url(path), json=body) as r:
        data = await r.json()
        return r.status, data, r.headers.get("x-router-replica")


async def test_requests_sharing_a_prefix_land_together_and_hit_the_cache(fleet: RouterFactory) -> None:
    router, _ = await fleet(profile="instant")
    async with aiohttp.ClientSession() as s:
        results = [await call(s, router, chat(SYSTEM, f"question {i}?")) for i in range(6)]
    assert all(status == 200 for status, _, _ in results)
    assert len({replica for _, _, replica in results}) == 1
    cached = [body["usage"]["prompt_tokens_details"]["cached_tokens"] for _, body, _ in results]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])


async def test_different_prefixes_spread_over_replicas(fleet: RouterFactory) -> None:
    router, _ = await fleet(profile="instant")
    async with aiohttp.ClientSession() as s:
        results = [await call(s, router, chat(f"{g} " * 200 + SYSTEM, "hi")) for g in range(8)]
    # cold prefixes on an idle fleet go round the replicas (cost's tie-break; not a random draw)
    assert len({replica for _, _, replica in results}) >= 3


async def test_a_hot_prefix_is_spread_when_it_overloads_one_replica(fleet: RouterFactory) -> None:
    router, _ = await fleet(profile="llmd-8b", time_scale=0.05, max_num_seqs=2)
    async with aiohttp.ClientSession() as s:
        await call(s, router, chat(SYSTEM, "warm up"))
        results = await asyncio.gather(*[call(s, router, chat(SYSTEM, f"q{i}", max_tokens=64))
                                         for i in range(24)])
    per_replica = Counter(replica for _, _, replica in results)
    assert all(status == 200 for status, _, _ in results)
    assert len(per_replica) >= 2, per_replica
    assert max(per_replica.values()) < 24


async def test_openai_sdk_streams_through_the_router(fleet: RouterFactory) -> None:
    router, _ = await fleet(profile="instant")
    client = openai.AsyncOpenAI(base_url=str(router.make_url("/v1")), api_key="unused")
    stream = await client.chat.completions.create(model="sim-model", max_tokens=8, stream=True,
                                                  messages=[{"role": "user", "content": "hello"}])
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces)
    whole = await client.completions.create(model="sim-model", prompt="hello", max_tokens=3)
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    await client.close()


async def test_stream_without_usage_request_gets_no_usage_chunk(fleet: RouterFactory) -> None:
    router, _ = await fleet(profile="instant")
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/chat/completions"),
                                                     json=chat(SYSTEM, "x", stream=True)) as r:
        raw = (await r.read()).decode()
    events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] for e in events[:-1])


async def test_a_dead_replica_is_avoided(fleet: RouterFactory) -> None:
    router, _ = await fleet(n=2, dead=1, profile="instant", policy="round_robin")
    async with aiohttp.ClientSession() as s:
        results = [await call(s, router, chat(f"{i} " * 50, "hi")) for i in range(12)]
    assert [status for status, _, _ in results] == [200] * 12
    assert not any(replica.startswith("dead") for _, _, replica in results)


async def test_client_disconnect_aborts_the_upstream_request(fleet: RouterFactory) -> None:
    router, engines = await fleet(n=1, profile="llmd-8b", time_scale=1.0)
    backend = engines[0].app[STATE].backend
    async with aiohttp.ClientSession() as s:
        r = await s.post(router.make_url("/v1/completions"),
                         json={"model": "sim-model", "prompt": "hello", "max_tokens": 2000, "stream": True})
        await r.content.readuntil(b"\n\n")
        assert backend.load_report().running == 1
        r.close()
    deadline = time.monotonic() + 30  # a hang guard: met at once unless the host is very busy
    while backend.load_report().running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert backend.load_report().running == 0
    assert router.app[ROUTER].registry.get("r0").in_flight_requests == 0


async def test_a_stream_cut_mid_way_ends_with_an_error_event(fleet: RouterFactory) -> None:
    router, _ = await fleet(n=1, profile="instant", faults={"drop_rate": 1.0})
    async with aiohttp.ClientSession() as s, s.post(
            router.make_url("/v1/completions"),
            json={"model": "sim-model", "prompt": "x", "max_tokens": 50, "stream": True}) as r:
        raw = await asyncio.wait_for(r.read(), 10)
    last = raw.decode().strip().split("\n\n")[-1]
    assert last.startswith("data: ") and "error" in json.loads(last[6:])


@pytest.mark.parametrize(("data", "status"), [(b"{not json", 400), (b"[1, 2]", 400),
                                              (b'{"model": "sim-model"}', 400)])
async def test_malformed_requests_get_4xx_not_500(fleet: RouterFactory, data: bytes, status: int) -> None:
    router, _ = await fleet(n=1, profile="instant")
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/chat/completions"), data=data) as r:
        assert r.status == status
        body = await r.json()
    assert body["error"]["type"] == "invalid_request_error"


async def test_unknown_paths_get_openai_404(fleet: RouterFactory) -> None:
    router, _ = await fleet(n=1, profile="instant")
    async with aiohttp.ClientSession() as s, s.get(router.make_url("/v1/embeddings/x")) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == 404


async def test_request_id_and_replica_name_come_back(fleet: RouterFactory) -> None:
    router, _ = await fleet(n=2, profile="instant")
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/chat/completions"),
                                                     json=chat("a", "b"), headers={"X-Request-Id": "rid-7"}) as r:
        assert r.headers["X-Request-Id"] == "rid-7"
        assert r.headers["x-router-replica"] in {"r0", "r1"}
        assert "rid-7-" in (await r.json())["id"]  # the engine saw it, with a suffix of the router's


async def test_models_is_the_union_of_healthy_replicas(fleet: RouterFactory) -> None:
    router, _ = await fleet(n=2, profile="instant")
    deadline = time.monotonic() + 30  # a hang guard: met at once unless the host is very busy
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            async with s.get(router.make_url("/v1/models")) as r:
                ids = [m["id"] for m in (await r.json())["data"]]
            if ids:
                break
            await asyncio.sleep(0.1)
    assert ids == ["sim-model"]


async def test_metrics_count_requests_and_cached_tokens(fleet: RouterFactory) -> None:
    router, _ = await fleet(n=1, profile="instant")
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            await call(s, router, chat(SYSTEM, f"q{i}"))
        async with s.get(router.make_url("/metrics")) as r:
            text = await r.text()
    assert 'router_requests_total{model="sim-model",replica="r0",status="200"} 3.0' in text
    assert 'router_cached_tokens_total{replica="r0"}' in text
    assert "router_decision_seconds_bucket" in text


async def test_requests_route_by_model_and_unknown_models_get_404(sim_server: SimServerFactory) -> None:
    llama = await sim_server(model_name="llama")
    qwen = await sim_server(model_name="qwen")
    cfg = parse_config({"replicas": [
        {"name": "l0", "url": str(llama.make_url("")).rstrip("/"), "models": ["llama"]},
        {"name": "q0", "url": str(qwen.make_url("")).rstrip("/"), "models": ["qwen"]}]})
    router = TestServer(create_app(cfg), host="127.0.0.1", handler_cancellation=True)
    await router.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            for model, replica in (("llama", "l0"), ("qwen", "q0"), ("llama", "l0"), ("qwen", "q0")):
                body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                status, data, chosen = await call(s, router, body)
                assert (status, data["model"], chosen) == (200, model, replica)
            status, data, _ = await call(s, router, {"model": "gpt-x", "messages": [{"role": "user", "content": "a"}]})
            assert status == 404 and data["error"]["code"] == "model_not_found"
            async with s.get(router.make_url("/v1/models")) as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["llama", "qwen"]
    finally:
        await router.close()
