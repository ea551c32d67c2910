"""The router's upstream HTTP/1.1 client (`router.proxy.http1`) and its failure classes (`open_upstream`):
bodies by length, chunks or the connection's end, keep-alive reuse only after a full read, each kind of
failure, idle streams, readers that stop early, and a clean shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.proxy.http1 import BadResponse, Disconnected, IdleTimeout, UpstreamPool
from router.proxy.upstream import Timeouts, UpstreamFailure, forward_headers, open_upstream
from tests.conftest import free_port

TIMEOUTS = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=30.0)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool()
    yield p
    await p.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Start an aiohttp app on loopback; the base URL."""
    started: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()  # handlers are cancelled when their client leaves, as engines run
        started.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for s in started:
        await s.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                    Awaitable[None]]], Awaitable[str]]]:
    """Start a raw TCP server running ``handle`` per connection; the base URL. Every connection is closed
    at the end, also those whose handler still waits for the router to hang up."""
    servers: list[asyncio.Server] = []
    handlers: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    async def start(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> str:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers[writer] = asyncio.current_task()  # type: ignore[assignment]
            try:
                await handle(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()
    for writer in handlers:
        writer.close()
    await asyncio.gather(*handlers.values(), return_exceptions=True)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) off a raw connection; b"" at its end."""
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length) if head else b""


def counting_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.Application,
                                                                                           set[Any]]:
    """``handler`` at POST /, and the set of client connections (peer addresses) the server saw."""
    peers: set[Any] = set()

    async def counted(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return await handler(request)

    app = web.Application()
    app.router.add_post("/", counted)
    return app, peers


async def answers_in_10s(request: web.Request) -> web.Response:
    """An engine slower than every timeout of these tests."""
    await asyncio.sleep(10)
    return web.Response()


async def one_event_then_silence(request: web.Request) -> web.StreamResponse:
    """An engine that sends one event and then nothing (until its client leaves)."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"data: 1\n\n")
    await asyncio.sleep(10)
    return resp


async def test_a_content_length_body_is_read_whole_and_the_connection_is_reused(pool: UpstreamPool,
                                                                                serve: Any) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"got " + await request.read(), headers={"X-Kind": "echo"})

    app, peers = counting_app(echo)
    url = await serve(app)
    for i in range(3):
        resp = await open_upstream(pool, url + "/", f"body {i}".encode(), {"X-Request-Id": "r"}, TIMEOUTS,
                                   frozenset(), stream=False)
        assert (resp.status, resp.header("x-kind"), await resp.read()) == (200, "echo", f"got body {i}".encode())
        resp.close()
    assert len(peers) == 1 and pool.open_count == 1 and pool.idle_count == 1


async def test_a_chunked_body_arrives_chunk_by_chunk_before_it_ends(pool: UpstreamPool, serve: Any) -> None:
    release = asyncio.Event()

    async def chunks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await release.wait()
        await resp.write(b"data: 2\n\n")
        return resp

    app, peers = counting_app(chunks)
    url = await serve(app)
    resp = await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset())
    assert resp.header("Transfer-Encoding") == "chunked"
    assert await resp.read_chunk() == b"data: 1\n\n"  # while the engine still holds the rest
    release.set()
    assert await resp.read() == b"data: 2\n\n" and await resp.read_chunk() == b""
    resp.close()
    assert pool.idle_count == 1


async def test_a_body_delimited_by_the_connections_end_is_read_whole_and_not_reused(pool: UpstreamPool,
                                                                                    raw: Any) -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        writer.close()

    url = await raw(http10)
    resp = await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset(), stream=False)
    assert await resp.read() == b"part one, part two"
    resp.close()
    assert pool.idle_count == 0


async def test_a_response_not_read_to_its_end_closes_the_connection_and_the_engine_sees_it(
        pool: UpstreamPool, serve: Any) -> None:
    engine_saw_disconnect = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"data: token\n\n")
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            engine_saw_disconnect.set()
            raise

    app, peers = counting_app(endless)
    url = await serve(app)
    resp = await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset())
    assert (await resp.read_chunk()).startswith(b"data: token")
    resp.close()  # the client left mid-stream
    await asyncio.wait_for(engine_saw_disconnect.wait(), 10)  # a hang guard, met at once
    assert pool.open_count == 0 and pool.idle_count == 0


async def test_a_request_on_a_connection_the_engine_closed_idle_is_sent_again_on_a_new_one(
        pool: UpstreamPool, raw: Any) -> None:
    requests_seen: list[int] = []  # per connection: how many requests it answered

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests_seen.append(0)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        requests_seen[-1] += 1
        await read_request(reader)  # the next request on this connection: closed unanswered (keep-alive ran out)
        writer.close()

    url = await raw(one_answer_per_connection)
    for _ in range(2):
        resp = await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset(), stream=False)
        assert await resp.read() == b"ok"
        resp.close()
    assert requests_seen[:2] == [1, 1]


async def test_a_connection_refused_is_a_connect_failure(pool: UpstreamPool) -> None:
    with pytest.raises(UpstreamFailure) as info:
        await open_upstream(pool, f"http://127.0.0.1:{free_port()}/", b"{}", {}, TIMEOUTS, frozenset())
    assert info.value.kind == "connect" and info.value.health_failure and info.value.retryable


async def test_no_head_within_first_byte_s_is_a_timeout_and_the_connection_is_dropped(
        pool: UpstreamPool, serve: Any) -> None:
    app, _ = counting_app(answers_in_10s)
    url = await serve(app)
    quick = Timeouts(connect_s=2.0, first_byte_s=0.2, idle_s=5.0, total_s=30.0)
    with pytest.raises(UpstreamFailure) as info:
        await open_upstream(pool, url + "/", b"{}", {}, quick, frozenset())
    assert info.value.kind == "timeout" and info.value.health_failure and info.value.retryable
    assert pool.open_count == 0


async def test_a_non_streamed_answer_past_total_s_is_a_deadline_not_retried(pool: UpstreamPool,
                                                                              serve: Any) -> None:
    app, _ = counting_app(answers_in_10s)
    url = await serve(app)
    short = Timeouts(connect_s=2.0, first_byte_s=0.05, idle_s=0.05, total_s=0.3)
    with pytest.raises(UpstreamFailure) as info:
        await open_upstream(pool, url + "/", b"{}", {}, short, frozenset(), stream=False)
    assert info.value.kind == "deadline" and not info.value.retryable and not info.value.health_failure


async def test_a_retry_status_is_read_with_its_body_and_retry_after_and_the_connection_kept(
        pool: UpstreamPool, serve: Any) -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "3"})

    app, peers = counting_app(busy)
    url = await serve(app)
    for _ in range(2):
        with pytest.raises(UpstreamFailure) as info:
            await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset({429, 503}))
        failure = info.value
        assert (failure.kind, failure.status, failure.retry_after) == ("status", 429, "3")
        assert failure.body == b'{"error": "busy"}' and failure.content_type.startswith("application/json")
        assert not failure.health_failure
    assert len(peers) == 1


async def test_a_response_that_is_not_http_is_a_protocol_failure(pool: UpstreamPool, raw: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the router hangs up

    url = await raw(garbage)
    with pytest.raises(UpstreamFailure) as info:
        await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset())
    assert info.value.kind == "protocol" and info.value.health_failure
    assert isinstance(info.value.__cause__, BadResponse) and pool.open_count == 0


async def test_a_connection_closed_before_the_head_is_a_connect_failure(pool: UpstreamPool, raw: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    url = await raw(hang_up)
    with pytest.raises(UpstreamFailure) as info:
        await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset())
    assert info.value.kind == "connect" and isinstance(info.value.__cause__, Disconnected)


async def test_a_stream_silent_for_idle_s_fails_the_read_and_drops_the_connection(pool: UpstreamPool,
                                                                                   serve: Any) -> None:
    app, _ = counting_app(one_event_then_silence)
    url = await serve(app)
    idle = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=0.3, total_s=30.0)
    resp = await open_upstream(pool, url + "/", b"{}", {}, idle, frozenset())
    assert await resp.read_chunk() == b"data: 1\n\n"
    with pytest.raises(IdleTimeout):
        await resp.read_chunk()
    resp.close()
    assert pool.open_count == 0


async def test_a_stream_broken_mid_way_fails_the_read(pool: UpstreamPool, raw: Any) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        writer.close()

    url = await raw(cut)
    resp = await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset())
    assert await resp.read_chunk() == b"data: 1\n\n"
    with pytest.raises(Disconnected):
        await resp.read_chunk()
    resp.close()


async def test_hop_by_hop_headers_are_not_forwarded(pool: UpstreamPool, raw: Any) -> None:
    async def headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                     b"Date: x\r\nServer: y\r\nX-Request-Id: engine-id\r\nX-Engine: e1\r\n\r\n")
        await writer.drain()
        await reader.read()

    url = await raw(headers)
    resp = await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset(), stream=False)
    assert forward_headers(resp) == {"X-Engine": "e1"}
    resp.close()


async def test_idle_connections_kept_per_origin_are_bounded(serve: Any) -> None:
    gate = asyncio.Event()

    async def wait(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(body=b"ok")

    app, peers = counting_app(wait)
    url = await serve(app)
    pool = UpstreamPool(max_idle_per_origin=2)
    try:
        calls = [asyncio.ensure_future(pool.post(url + "/", b"", {}, connect_s=2.0, head_s=5.0)) for _ in range(5)]
        while len(peers) < 5:  # all five are in the engine
            await asyncio.sleep(0.01)
        gate.set()
        for resp in await asyncio.gather(*calls):
            assert await resp.read() == b"ok"
            resp.close()
        assert (pool.idle_count, pool.open_count) == (2, 2)
    finally:
        await pool.close()


async def test_closing_the_pool_closes_connections_in_use_and_refuses_new_calls(serve: Any) -> None:
    app, _ = counting_app(one_event_then_silence)
    url = await serve(app)
    pool = UpstreamPool()
    resp = await pool.post(url + "/", b"", {}, connect_s=2.0, head_s=5.0)
    await pool.close()
    assert pool.open_count == 0
    with pytest.raises(Disconnected):
        while await resp.read_chunk():
            pass
    resp.close()
    with pytest.raises(UpstreamFailure) as info:
        await open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset())
    assert info.value.kind == "connect"


async def test_a_call_cancelled_before_the_head_closes_its_connection(pool: UpstreamPool, serve: Any) -> None:
    engine_saw_disconnect = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            engine_saw_disconnect.set()
            raise
        return web.Response()

    app, peers = counting_app(slow)
    url = await serve(app)
    call = asyncio.ensure_future(open_upstream(pool, url + "/", b"{}", {}, TIMEOUTS, frozenset()))
    while not peers:
        await asyncio.sleep(0.01)
    call.cancel()  # the router's client left before the first token
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(engine_saw_disconnect.wait(), 10)  # a hang guard, met at once
    assert pool.open_count == 0


async def test_a_get_sends_no_body_and_shares_the_keep_alive_connection(pool: UpstreamPool, raw: Any) -> None:
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await raw(answer)
    for _ in range(2):
        resp = await pool.get(url + "/load?x=1", {"Accept": "application/json"}, connect_s=2.0, head_s=2.0)
        assert (resp.status, await resp.read()) == (200, b"ok")
        resp.close()
    assert len(heads) == 2 and pool.open_count == 1  # one connection, reused
    assert heads[0].startswith(b"GET /load?x=1 HTTP/1.1\r\n")
    assert b"accept: application/json" in heads[0].lower() and b"content-length" not in heads[0].lower()
