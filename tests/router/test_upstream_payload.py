"""What the router sends a replica: the client's bytes unless it must ask for usage, and then the same
object re-encoding would have sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from config.router import parse_config
from router.app import create_app
from router.proxy.payload import upstream_payload

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi \u00e9 \u4e2d"}], "max_tokens": 2}


def usage_added(body: dict[str, Any]) -> dict[str, Any]:
    opts = body.get("stream_options")
    return {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}


@pytest.mark.parametrize("raw", [
    json.dumps({**CHAT, "stream": True}).encode(),  # spaces after separators, \u escapes
    json.dumps({**CHAT, "stream": True}, ensure_ascii=False, separators=(",", ":")).encode(),  # raw UTF-8
    b" \r\n\t" + json.dumps({**CHAT, "stream": True}, indent=2).encode() + b"\n",  # whitespace around
])
def test_a_stream_without_stream_options_gets_usage_spliced_into_the_clients_bytes(raw: bytes) -> None:
    body = json.loads(raw)
    payload, strip = upstream_payload(body, raw, stream=True)
    assert strip
    assert json.loads(payload) == usage_added(body)
    assert payload.endswith(raw[raw.index(b"{") + 1:])  # the client's members, byte for byte


@pytest.mark.parametrize("body", [
    {**CHAT, "stream": False},
    {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
])
def test_a_body_needing_no_change_is_forwarded_as_the_client_sent_it(body: dict[str, Any]) -> None:
    raw = json.dumps(body, indent=1).encode()
    assert upstream_payload(body, raw, stream=bool(body.get("stream"))) == (raw, False)


@pytest.mark.parametrize("body", [
    {**CHAT, "stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": True}},
    {**CHAT, "stream": True, "stream_options": None},
])
def test_the_clients_own_stream_options_are_kept_with_usage_turned_on(body: dict[str, Any]) -> None:
    payload, strip = upstream_payload(body, json.dumps(body).encode(), stream=True)
    assert strip and json.loads(payload) == usage_added(body)


@pytest.mark.parametrize("raw", [
    json.dumps({**CHAT, "stream": True}).encode("utf-16"),  # json.loads reads UTF-16; an engine may not
    json.dumps({**CHAT, "stream": True}).encode("utf-8-sig"),  # a byte order mark
])
def test_bodies_in_other_encodings_are_sent_as_utf8_json(raw: bytes) -> None:
    body = json.loads(raw)
    payload, strip = upstream_payload(body, raw, stream=True)
    assert strip and payload.startswith(b"{") and json.loads(payload.decode("utf-8")) == usage_added(body)
    no_change, _ = upstream_payload(body, raw, stream=False)
    assert no_change.startswith(b"{") and json.loads(no_change.decode("utf-8")) == body


def test_an_empty_object_gets_no_dangling_comma() -> None:
    payload, strip = upstream_payload({}, b"{ }", stream=True)
    assert strip and json.loads(payload) == {"stream_options": {"include_usage": True}}


def test_without_the_bytes_the_parsed_body_is_encoded() -> None:
    body = {**CHAT, "stream": True}
    payload, strip = upstream_payload(body, None, stream=True)
    assert strip and json.loads(payload) == usage_added(body)


@pytest.fixture
async def recording_engine() -> AsyncIterator[tuple[TestServer, list[bytes]]]:
    """An engine that keeps every generation body it receives and streams one token with usage."""
    received: list[bytes] = []

    async def generate(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        received.append(raw)
        if not json.loads(raw).get("stream"):
            return web.json_response({"choices": [{"message": {"content": "x"}}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n')
        await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
                         b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, received
    await server.close()


Post = Callable[[bytes], Awaitable[bytes]]


@pytest.fixture
async def post_raw(recording_engine: tuple[TestServer, list[bytes]]) -> AsyncIterator[Post]:
    engine, _ = recording_engine
    cfg = parse_config({"replicas": [{"name": "r0", "url": str(engine.make_url("")).rstrip("/"),
                                      "models": ["m"]}]})
    router = TestServer(create_app(cfg, tracing=None), host="127.0.0.1")
    await router.start_server()
    async with aiohttp.ClientSession() as session:
        async def post(raw: bytes) -> bytes:
            async with session.post(router.make_url("/v1/chat/completions"), data=raw,
                                    headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
                return await r.read()
        yield post
    await router.close()


async def test_the_engine_receives_the_clients_bytes_and_the_client_no_usage_it_did_not_ask_for(
        recording_engine: tuple[TestServer, list[bytes]], post_raw: Post) -> None:
    _, received = recording_engine
    unary = json.dumps({**CHAT, "stream": False}, indent=3).encode()
    await post_raw(unary)
    streamed = json.dumps({**CHAT, "stream": True}, ensure_ascii=False).encode()
    events = await post_raw(streamed)
    assert received[0] == unary
    assert received[1] == b'{"stream_options":{"include_usage":true},' + streamed[1:]
    assert b'"usage":{' not in events and events.endswith(b"data: [DONE]\n\n")
