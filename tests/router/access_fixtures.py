"""A router in front of one sim engine, for the auth and limits tests (not a test module)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.router import parse_config
from router.app import create_app
from tests.conftest import SimServerFactory

USER_KEY = "sk-user-0123456789abcdef"
ADMIN_KEY = "sk-admin-fedcba9876543210"
StartRouter = Callable[..., Awaitable[TestServer]]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def completion(max_tokens: int = 2, stream: bool = False) -> dict[str, Any]:
    return {"model": "sim-model", "prompt": "hello", "max_tokens": max_tokens, "stream": stream}


async def post(session: aiohttp.ClientSession, server: TestServer, key: str | None = None,
               body: dict[str, Any] | None = None) -> aiohttp.ClientResponse:
    """POST /v1/completions and read the body (the response stays usable for status/headers/json)."""
    r = await session.post(server.make_url("/v1/completions"), json=body or completion(),
                           headers=bearer(key) if key else {})
    await r.read()
    return r


@asynccontextmanager
async def router_factory(sim_server: SimServerFactory) -> AsyncIterator[StartRouter]:
    """start(router_cfg, routes=fn(app), **sim): a router whose config is `router_cfg` merged over one sim
    replica; `routes` may add test-only routes before the app starts. All are closed on exit."""
    servers: list[TestServer] = []

    async def start(router_cfg: dict[str, Any] | None = None, *,
                    routes: Callable[[web.Application], None] | None = None, **sim: Any) -> TestServer:
        engine = await sim_server(**sim)
        cfg = parse_config({"replicas": [{"name": "r0", "url": str(engine.make_url("")).rstrip("/")}],
                            "health": {"check_interval_s": 0.2}, "load": {"poll_interval_s": 0.1},
                            **(router_cfg or {})})
        app = create_app(cfg)
        if routes is not None:
            routes(app)
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for s in servers:
            await s.close()
