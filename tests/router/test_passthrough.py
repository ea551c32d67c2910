"""Passthrough paths (`passthrough_paths`: embeddings, score, rerank): the body reaches a replica serving
its model byte for byte, the answer comes back as the engine gave it, and the request is routed, retried,
counted and refused like a generation request."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.router import ConfigError, parse_config
from router.app import ROUTER, create_app
from tests.conftest import AppServerFactory

MODEL = "embed-model"


@dataclass
class Engine:
    """Answers /v1/embeddings with ``status``; records what it was sent. ``hold`` (if set) keeps each
    request open until it is set."""

    status: int = 200
    bodies: list[bytes] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None

    def app(self) -> web.Application:
        async def embeddings(request: web.Request) -> web.Response:
            self.bodies.append(await request.read())
            self.request_ids.append(request.headers.get("X-Request-Id", ""))
            if self.hold is not None:
                await self.hold.wait()
            if self.status != 200:
                return web.json_response({"error": {"message": "busy", "type": "server_error", "param": None,
                                                    "code": self.status}}, status=self.status)
            return web.json_response({"object": "list", "model": MODEL, "usage": {"prompt_tokens": 3,
                                                                                  "total_tokens": 3},
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}]})

        async def ok(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        app = web.Application()
        app.router.add_post("/v1/embeddings", embeddings)
        app.router.add_get("/health", ok)
        app.router.add_get("/v1/models", models)
        return app


Start = AppServerFactory


async def start_router(servers: Start, engines: list[Engine], **cfg: Any) -> TestServer:
    urls = [str((await servers(e.app())).make_url("")).rstrip("/") for e in engines]
    config = parse_config({"replicas": [{"name": f"r{i}", "url": u, "models": [MODEL]} for i, u in enumerate(urls)],
                           "health": {"check_interval_s": 0.2}, **cfg})
    return await servers(create_app(config))


async def post(router: TestServer, path: str, data: bytes, **headers: str) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as s, s.post(router.make_url(path), data=data, headers={
            "Content-Type": "application/json", **headers}) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


EMBED = json.dumps({"model": MODEL, "input": "hello world", "encoding_format": "float"}, indent=1).encode()


async def test_an_embeddings_request_reaches_the_engine_byte_for_byte_and_its_answer_comes_back(servers: Start) -> None:
    engine = Engine()
    router = await start_router(servers, [engine])
    status, headers, body = await post(router, "/v1/embeddings", EMBED, **{"X-Request-Id": "emb-1"})
    assert status == 200
    assert body["data"][0]["embedding"] == [0.5, -1.0]
    assert engine.bodies == [EMBED]  # not re-encoded, no usage request spliced in
    assert headers["x-request-id"] == "emb-1"
    assert headers["x-router-replica"] == "r0"
    assert engine.request_ids[0].startswith("emb-1-")


async def test_a_passthrough_request_without_a_model_is_a_400_naming_model(servers: Start) -> None:
    engine = Engine()
    router = await start_router(servers, [engine])
    status, _, body = await post(router, "/v1/embeddings", b'{"input": "hi"}')
    assert status == 400
    assert body["error"]["param"] == "model"
    assert engine.bodies == []


async def test_a_passthrough_body_that_is_not_json_is_a_400_and_never_sent(servers: Start) -> None:
    engine = Engine()
    router = await start_router(servers, [engine])
    status, _, body = await post(router, "/v1/embeddings", b'{"model": ')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert engine.bodies == []


async def test_a_passthrough_request_for_a_model_no_replica_serves_is_a_404(servers: Start) -> None:
    router = await start_router(servers, [Engine()])
    status, _, body = await post(router, "/v1/embeddings", b'{"model": "other", "input": "hi"}')
    assert status == 404
    assert body["error"]["code"] == "model_not_found"


async def test_a_path_not_configured_for_passthrough_is_a_404(servers: Start) -> None:
    engine = Engine()
    router = await start_router(servers, [engine], passthrough_paths=["/v1/score"])
    status, _, body = await post(router, "/v1/embeddings", EMBED)
    assert status == 404
    assert "error" in body
    assert engine.bodies == []


async def test_a_failing_replica_is_retried_on_another(servers: Start) -> None:
    failing, healthy = Engine(status=503), Engine()
    router = await start_router(servers, [failing, healthy], retry={"max_attempts": 2},
                                policy={"name": "round_robin"})
    statuses = [(await post(router, "/v1/embeddings", EMBED))[0] for _ in range(2)]
    assert statuses == [200, 200]
    assert len(healthy.bodies) == 2
    assert len(failing.bodies) <= 2  # tried at most once per request, then the other replica


async def test_a_passthrough_request_counts_as_in_flight_work_on_its_replica(servers: Start) -> None:
    held = asyncio.Event()
    engines = [Engine(hold=held), Engine(hold=held)]
    router = await start_router(servers, engines)  # default policy: cost
    first = asyncio.ensure_future(post(router, "/v1/embeddings", EMBED))
    while not any(e.bodies for e in engines):
        await asyncio.sleep(0.01)
    busy = next(i for i, e in enumerate(engines) if e.bodies)
    in_flight = {r.name: r.in_flight_requests for r in router.app[ROUTER].registry.all()}
    assert in_flight[f"r{busy}"] == 1
    second = asyncio.ensure_future(post(router, "/v1/embeddings", EMBED))
    while sum(len(e.bodies) for e in engines) < 2:
        await asyncio.sleep(0.01)
    held.set()
    assert [(await first)[0], (await second)[0]] == [200, 200]
    assert [len(e.bodies) for e in engines] == [1, 1]  # the second went where nothing was in flight


def test_a_passthrough_path_outside_v1_or_on_a_router_route_is_refused_naming_the_field() -> None:
    for bad in (["/admin/replicas"], ["/v1/chat/completions"], ["/v1/{tail}"], ["/v1/score", "/v1/score"]):
        with pytest.raises(ConfigError, match="passthrough_paths"):
            parse_config({"passthrough_paths": bad})


def test_a_reload_that_changes_passthrough_paths_waits_for_a_restart() -> None:
    from router.reload import RESTART_FIELDS

    assert "passthrough_paths" in RESTART_FIELDS
