"""The end of a stream: the replica's outcome is recorded before the client hears the end, so a client
that sends its next request the moment one ends finds the fleet as it is."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.router import parse_config
from router.app import ROUTER, create_app
from tests.conftest import AppServerFactory, SimServerFactory

CHAT = {"model": "sim-model", "max_tokens": 4, "stream": True,
        "messages": [{"role": "user", "content": "the end of a stream"}]}


async def test_the_lease_is_released_and_the_policy_fed_before_the_stream_ends(
        sim_server: SimServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await sim_server(profile="instant")
    cfg = parse_config({"replicas": [{"name": "r0", "url": str(engine.make_url("")).rstrip("/")}],
                        "policy": {"name": "cost"}})
    app = create_app(cfg, tracing=None)
    router = TestServer(app, host="127.0.0.1")
    await router.start_server()
    seen: list[tuple[int, int]] = []  # (requests in flight on r0, observations learned) at each stream's end
    ended: set[int] = set()  # aiohttp calls write_eof again after the handler: only the first counts
    write_eof = web.StreamResponse.write_eof

    async def recording_write_eof(self: web.StreamResponse, data: bytes = b"") -> Any:
        if "x-router-replica" in self.headers and id(self) not in ended:  # the router's (the engine is here too)
            ended.add(id(self))
            state = app[ROUTER]
            replica = state.registry.get("r0")
            assert replica is not None and state.dispatcher is not None
            seen.append((replica.in_flight_requests, state.dispatcher.policy.calibrator.observations("r0")))
        return await write_eof(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", recording_write_eof)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(router.make_url("/v1/chat/completions"), json=CHAT) as r:
                    assert r.status == 200
                    assert (await r.read()).endswith(b"data: [DONE]\n\n")
    finally:
        await router.close()
    assert [in_flight for in_flight, _ in seen] == [0, 0]
    assert seen[0][1] > 0 and seen[1][1] > seen[0][1]  # each stream's timing was learned before its end


async def test_a_failure_recording_the_outcome_still_ends_the_clients_stream(
        sim_server: SimServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await sim_server(profile="instant")
    cfg = parse_config({"replicas": [{"name": "r0", "url": str(engine.make_url("")).rstrip("/")}]})
    app = create_app(cfg, tracing=None)
    router = TestServer(app, host="127.0.0.1")
    await router.start_server()
    dispatcher = app[ROUTER].dispatcher
    assert dispatcher is not None

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug while recording the outcome")

    monkeypatch.setattr(dispatcher, "_stream_outcome", broken)
    try:  # a stream never ended would hang its reader: the timeout turns that into a failure
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(router.make_url("/v1/chat/completions"), json=CHAT) as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")  # a complete chunked body
            async with s.post(router.make_url("/v1/chat/completions"), json=CHAT) as r:  # still serving
                assert r.status == 200
    finally:
        await router.close()


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def test_a_client_that_closes_at_done_before_the_body_ends_is_a_success_and_its_prefix_stays(
        servers: AppServerFactory) -> None:
    """OpenAI's Python SDK closes the response as soon as it reads ``data: [DONE]``; an engine may end its
    chunked body a moment later. The client had its whole answer: not a disconnect, and the prompt's
    blocks stay in the policy's index (they were dropped, and the next turn routed blind)."""
    over = asyncio.Event()
    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}))
        await resp.write(_sse({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 1,
                                                        "prompt_tokens_details": {"cached_tokens": 0}}}))
        await resp.write(b"data: [DONE]\n\n")
        with contextlib.suppress(TimeoutError):  # the end of the body comes only when the test is over
            await asyncio.wait_for(over.wait(), 30)
        await resp.write_eof()
        return resp

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    engines = []
    for _ in range(2):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", ok)
        engines.append(await servers(app))
    cfg = parse_config({"replicas": [{"name": f"r{i}", "url": str(e.make_url("")).rstrip("/"), "models": ["m"]}
                                     for i, e in enumerate(engines)], "policy": {"name": "cost"}})
    app = create_app(cfg, tracing=None)
    router = await servers(app)
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "a long shared system prompt " * 20},
                         {"role": "user", "content": "first"}]}
    replicas = []
    async with aiohttp.ClientSession() as s:
        for turn in ("first", "second"):
            body["messages"][1]["content"] = turn
            r = await s.post(router.make_url("/v1/chat/completions"), json=body)
            replicas.append(r.headers["x-router-replica"])
            while not (await r.content.readline()).startswith(b"data: [DONE]"):
                pass
            r.close()  # as the SDK does: the rest of the body is not read
            state = app[ROUTER]
            for _ in range(1000):  # the router notices the close (the body never ends) and records it
                if all(rep.in_flight_requests == 0 for rep in state.registry.all()):
                    break
                await asyncio.sleep(0.01)
            assert all(rep.in_flight_requests == 0 for rep in state.registry.all())
    over.set()
    assert app[ROUTER].metrics.client_disconnects._value.get() == 0
    assert replicas[1] == replicas[0]  # the first turn's prefix was kept: the second follows it
