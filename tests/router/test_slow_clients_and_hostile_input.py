"""Slow clients and hostile bodies against the router: bounded waits, no slot held, 4xx in OpenAI format."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config.router import ConfigError, parse_config
from router.app import create_app, harden, runner_kwargs
from tests.conftest import SimServerFactory

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


async def raw_exchange(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or `wait_s` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        out += b"<still open>"
    writer.close()
    return out


def post(body: bytes, *extra: bytes, path: bytes = b"/v1/completions", length: int | None = None) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json", *extra,
            b"Content-Length: %d" % (len(body) if length is None else length)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return status, err


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


HOSTILE_BODIES = {
    "deep array": b"[" * 100_000 + b"]" * 100_000,
    "deep inside an object": b'{"model":"sim-model","prompt":' + b"[" * 900 + b"]" * 900 + b"}",
    "lone surrogate in model": b'{"model":"\\udc80","prompt":"x"}',
    "lone surrogate in content": b'{"model":"sim-model","messages":[{"role":"user","content":"a\\ud800b"}]}',
    "invalid utf-8": b'{"model":"sim-model","prompt":"\xff\xfe"}',
    "not an object": b"[1,2,3]",
    "truncated": b'{"model":',
}


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


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
], ids=["bad request line", "header flood", "bad chunking", "header too long"])
async def test_protocol_errors_are_answered_in_openai_json(router: Start, data: bytes) -> None:
    server = await router()
    status, _ = status_and_error(await raw_exchange(server.port, data))
    assert 400 <= status < 500


async def test_the_router_still_serves_after_hostile_input(router: Start) -> None:
    server = await router()
    for body in HOSTILE_BODIES.values():
        await raw_exchange(server.port, post(body))
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/metrics")) as r:
            assert r.status == 200
        async with s.post(server.make_url("/v1/completions"), json={"model": "sim-model", "prompt": "x"}) as r:
            assert r.status == 200
