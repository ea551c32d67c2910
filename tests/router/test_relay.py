"""The SSE relay: events pass through whole, usage is read on the way, a stalled upstream ends clearly."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import httptools
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.proxy.http1 import UpstreamPool
from router.proxy.relay import EventStreamResponse, RelayResult, _take_usage, relay_sse
from router.proxy.upstream import Timeouts, open_upstream

USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def streaming_engine(parts: list[bytes], stall_s: float = 0.0) -> web.Application:
    """An engine answering POST /e with ``parts`` as separate writes, 10 ms apart, then ``stall_s`` of silence."""
    async def engine(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(0.01)
        await asyncio.sleep(stall_s)
        return resp

    app = web.Application()
    app.router.add_post("/e", engine)
    return app


async def relay(parts: list[bytes], *, stall_s: float = 0.0, strip: bool = True) -> tuple[bytes, RelayResult]:
    """Serve ``parts`` as separate writes (then stall ``stall_s``), relay them, return what the client got."""
    results: list[RelayResult] = []

    async def router(request: web.Request) -> web.StreamResponse:
        timeouts = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=0.3, total_s=30.0)
        pool = UpstreamPool()
        up = await open_upstream(pool, str(upstream.make_url("/e")), b"{}", {}, timeouts, frozenset())
        resp = web.StreamResponse()
        await resp.prepare(request)
        results.append(await relay_sse(up, resp, timeouts.idle_s, strip))
        await resp.write_eof(results[-1].tail)
        up.close()
        await pool.close()
        return resp

    router_app = web.Application()
    router_app.router.add_get("/", router)
    async with (TestServer(streaming_engine(parts, stall_s)) as upstream, TestServer(router_app) as front,
                aiohttp.ClientSession() as client, client.get(front.make_url("/")) as r):
        body = await r.read()
    return body, results[0]


async def test_events_split_across_reads_arrive_whole_and_in_order() -> None:
    a, b = event({"choices": [{"delta": {"content": "a"}}]}), event({"choices": [{"delta": {"content": "b"}}]})
    body, result = await relay([a[:5], a[5:] + b[:9], b[9:], b"data: [DONE]\n\n"])
    assert body == a + b + b"data: [DONE]\n\n"
    assert result.error is None and result.bytes_out == len(body) and result.first_byte_at is not None


async def test_the_usage_is_read_and_the_usage_only_event_the_router_asked_for_is_not_forwarded() -> None:
    token = event({"choices": [{"delta": {"content": "a"}}], "usage": None})
    usage_only = event({"choices": [], "usage": USAGE})
    body, result = await relay([token, usage_only + b"data: [DONE]\n\n"])
    assert body == token + b"data: [DONE]\n\n"
    assert result.usage == USAGE


async def test_the_usage_only_event_is_forwarded_when_the_client_asked_for_usage() -> None:
    usage_only = event({"choices": [], "usage": USAGE})
    body, result = await relay([usage_only, b"data: [DONE]\n\n"], strip=False)
    assert body == usage_only + b"data: [DONE]\n\n" and result.usage == USAGE


@pytest.mark.parametrize("tail", [b"", b"data: {\"partial"], ids=["between-events", "mid-event"])
async def test_an_upstream_that_stalls_past_idle_s_ends_the_stream_with_an_error_event(tail: bytes) -> None:
    first = event({"choices": [{"delta": {"content": "a"}}]})
    body, result = await relay([first, tail] if tail else [first], stall_s=3.0)
    assert result.error == "replica sent nothing for 0.3s"
    assert body.startswith(first + tail) and b'"type": "server_error"' in body and body.endswith(b"\n\n")


async def test_token_events_read_together_with_the_usage_event_are_all_forwarded() -> None:
    tokens = [event({"choices": [{"delta": {"content": c}}], "usage": None}) for c in "abc"]
    usage_only = event({"choices": [], "usage": USAGE})
    body, result = await relay([b"".join(tokens) + usage_only + b"data: [DONE]\n\n"])
    assert body == b"".join(tokens) + b"data: [DONE]\n\n" and result.usage == USAGE


async def test_a_slow_client_gets_every_event_in_order_through_pauses_to_let_it_catch_up() -> None:
    events = [event({"choices": [{"delta": {"content": f"{i:05d}" + "x" * 1000}}]}) for i in range(2000)]

    async def engine(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(e)
        return resp

    async def router(request: web.Request) -> web.StreamResponse:
        timeouts = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=30.0)
        pool = UpstreamPool()
        up = await open_upstream(pool, str(upstream.make_url("/e")), b"{}", {}, timeouts, frozenset())
        resp = web.StreamResponse()
        await resp.prepare(request)
        assert request.transport is not None  # small kernel buffers: the router's own buffer fills and drains
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await resp.write_eof((await relay_sse(up, resp, timeouts.idle_s, True)).tail)
        up.close()
        await pool.close()
        return resp

    class Body:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def on_body(self, body: bytes) -> None:
            self.parts.append(body)

    engine_app, router_app = web.Application(), web.Application()
    engine_app.router.add_post("/e", engine)
    router_app.router.add_get("/", router)
    async with TestServer(engine_app) as upstream, TestServer(router_app) as front:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that takes little at a time
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (front.host, front.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = Body()
        parser = httptools.HttpResponseParser(body)
        while data := await reader.read(4096):
            parser.feed_data(data)
            await asyncio.sleep(0.0005)
        writer.close()
    assert b"".join(body.parts) == b"".join(events)


def test_every_usage_only_event_of_a_read_is_taken_out_and_the_last_usage_kept() -> None:
    tokens = [event({"choices": [{"delta": {"content": c}}], "usage": None}) for c in ('"usage":{', "b")]
    with_choice = event({"choices": [{"delta": {"content": "c"}}], "usage": {"prompt_tokens": 1}})
    spaced = b'data: {"choices": [], "usage": {"prompt_tokens": 2}}\n\n'
    usage_only = event({"choices": [], "usage": USAGE})
    done = b"data: [DONE]\n\n"
    events = tokens[0] + spaced + tokens[1] + with_choice + usage_only + done
    result = RelayResult()
    assert _take_usage(events, result, True) == tokens[0] + tokens[1] + with_choice + done
    assert result.usage == USAGE
    kept = RelayResult()
    assert _take_usage(events, kept, False) == events and kept.usage == USAGE


class Writes:
    """A client side of the relay that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(data)


async def test_events_read_together_with_the_end_of_the_body_are_left_for_the_callers_write_eof() -> None:
    events = event({"choices": [{"delta": {"content": "a"}}]}) + b"data: [DONE]\n\n"
    whole = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
             + f"{len(events):x}\r\n".encode() + events + b"\r\n0\r\n\r\n")

    class OneWrite(asyncio.Protocol):  # the whole answer in one send: one read on the router's side
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(whole)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(OneWrite, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool()
    try:
        timeouts = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=30.0)
        up = await open_upstream(pool, f"http://127.0.0.1:{port}/e", b"{}", {}, timeouts, frozenset(), stream=True)
        client = Writes()
        result = await relay_sse(up, client, timeouts.idle_s, True)  # type: ignore[arg-type]
        up.close()
    finally:
        await pool.close()
        server.close()
    assert client.writes == []  # nothing written yet: it all goes with the end, in one write
    assert result.tail == events and result.bytes_out == len(events) and result.first_byte_at is not None


async def test_what_the_relay_writes_and_its_tail_are_the_whole_stream_however_reads_fall() -> None:
    parts = [event({"choices": [{"delta": {"content": c}}]}) for c in "abc"] + [b"data: [DONE]\n\n"]
    pool = UpstreamPool()
    async with TestServer(streaming_engine(parts)) as upstream:
        timeouts = Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0, total_s=30.0)
        up = await open_upstream(pool, str(upstream.make_url("/e")), b"{}", {}, timeouts, frozenset(), stream=True)
        client = Writes()
        result = await relay_sse(up, client, timeouts.idle_s, True)  # type: ignore[arg-type]
        up.close()
        await pool.close()
    assert b"".join(client.writes) + result.tail == b"".join(parts)
    assert result.bytes_out == len(b"".join(parts))


async def test_a_streamed_answers_headers_wait_for_its_first_bytes() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = EventStreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await release.wait()
        await resp.write(b"data: x\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        with pytest.raises(TimeoutError):  # prepared, but nothing sent before the first event
            await asyncio.wait_for(reader.read(1), 0.3)
        release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"data: x" in await asyncio.wait_for(reader.readuntil(b"data: x\n\n"), 5)
        writer.close()
