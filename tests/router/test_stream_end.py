"""The end of a stream: the replica's outcome is recorded before the client hears the end, so a client
that sends its next request the moment one ends finds the fleet as it is."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.router import parse_config
from router.app import ROUTER, create_app
from tests.conftest import SimServerFactory

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
