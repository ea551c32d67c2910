"""Slow clients and hostile bodies against the router: bounded waits, no slot held, 4xx in OpenAI format."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config.router import ConfigError, parse_config
from router.app import create_app, harden, runner_kwargs
from tests.conftest import SimServerFactory
from tests.hostile_input import (
    HOSTILE_BODIES,
    PROTOCOL_ERRORS,
    assert_still_serves,
    post,
    raw_exchange,
    status_and_error,
)

Start = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def router(sim_server: SimServerFactory) -> AsyncIterator[Start]:
    servers: list[TestServer] = []

    async def start(**cfg: Any) -> TestServer:
        engine = await sim_server()
        config = parse_config({"replicas": [{"name": "r0", "url": str(engine.make_url("")).rstrip("/")}],
                               "health": {"check_interval_s": 0.2}, **cfg})
        server = TestServer(create_app(config), host="127.0.0.1")
        await server.start_server(**runner_kwargs(config))
        harden(server.runner)
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close()


async def test_slow_body_senders_hold_no_in_flight_slot_and_are_cut_after_the_body_timeout(router: Start) -> None:
    server = await router(limits={"max_in_flight": 2}, client_timeouts={"body_s": 1.0})
    # Two clients announce 1000 bytes and send 10: before the fix each took one of the two slots.
    slow = [asyncio.ensure_future(raw_exchange(server.port, post(b'{"model":', length=1000)))
            for _ in range(2)]
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/completions"),
                                                     json={"model": "sim-model", "prompt": "hi"}) as r:
        assert r.status == 200, await r.text()
    for answer in await asyncio.gather(*slow):
        status, err = status_and_error(answer)
        assert status == 408 and "1s" in err["message"]


async def test_a_connection_that_never_finishes_its_headers_is_closed(router: Start) -> None:
    server = await router(client_timeouts={"header_s": 0.5})
    answer = await raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait_s=10)
    assert answer == b""  # closed by the server, long before the 10 s guard


def test_client_timeouts_are_validated_with_the_field_path() -> None:
    with pytest.raises(ConfigError, match=r"client_timeouts\.body_s"):
        parse_config({"client_timeouts": {"body_s": 0}})
    with pytest.raises(ConfigError, match=r"client_timeouts\.header_s"):
        parse_config({"client_timeouts": {"header_s": -1}})


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
async def test_hostile_json_is_a_400_in_openai_format(router: Start, name: str) -> None:
    server = await router()
    status, err = status_and_error(await raw_exchange(server.port, post(HOSTILE_BODIES[name])))
    assert status == 400, err


async def test_a_corrupt_gzip_body_is_a_400_and_a_gzip_bomb_stops_at_the_size_limit(router: Start) -> None:
    server = await router(max_body_bytes=64 * 1024)
    status, _ = status_and_error(await raw_exchange(server.port, post(b"not gzip at all",
                                                                      b"Content-Encoding: gzip")))
    assert status == 400
    bomb = gzip.compress(b"\0" * (20 << 20))
    status, err = status_and_error(await raw_exchange(server.port, post(bomb, b"Content-Encoding: gzip")))
    assert status == 413, err


@pytest.mark.parametrize("data", list(PROTOCOL_ERRORS.values()), ids=list(PROTOCOL_ERRORS))
async def test_protocol_errors_are_answered_in_openai_json(router: Start, data: bytes) -> None:
    server = await router()
    status, _ = status_and_error(await raw_exchange(server.port, data))
    assert 400 <= status < 500


async def test_the_router_still_serves_after_hostile_input(router: Start) -> None:
    server = await router()
    for body in HOSTILE_BODIES.values():
        await raw_exchange(server.port, post(body))
    await assert_still_serves(str(server.make_url("")).rstrip("/"))
