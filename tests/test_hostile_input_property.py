"""Property: whatever JSON (or near-JSON) a client sends, router and engine server answer below 500, and
every error is in OpenAI's format. Hypothesis generates the bodies (derandomized: same cases every run)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.router import parse_config
from engine_server.app import create_app as engine_app
from engine_server.sim.backend import SimBackend, SimConfig
from openai_http import install_json_protocol_errors
from router.app import create_app as router_app

FIELDS = ["model", "prompt", "messages", "max_tokens", "n", "stream", "stream_options", "temperature",
          "top_p", "stop", "seed", "user", "tools", "role", "content", "max_completion_tokens"]
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False) | st.text(max_size=30) | st.sampled_from(["sim-model", "user", "\udc80"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4),
                      max_leaves=20)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
raw_bodies = (bodies.map(lambda b: json.dumps(b).encode("utf-8", "surrogatepass"))
              | st.binary(max_size=200) | values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")))


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """A sim engine and a router in front of it, served from a background thread's event loop."""
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> int:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        install_json_protocol_errors(runner)
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    async def start() -> None:
        engine = await serve(engine_app(SimBackend(SimConfig(model_name="sim-model", profile="instant"))))
        cfg = parse_config({"replicas": [{"name": "r0", "url": f"http://127.0.0.1:{engine}"}]})
        ready["ports"] = (await serve(router_app(cfg)), engine)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    yield ready["ports"]

    async def stop() -> None:
        for r in runners:
            await r.cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=raw_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
def test_any_body_gets_an_answer_below_500_with_openai_errors(ports: tuple[int, int], body: bytes,
                                                              path: str) -> None:
    for port in ports:
        status, data = post(port, path, body)
        assert status < 500, (port, status, data[:200])
        if status >= 400:
            err = json.loads(data)["error"]
            assert {"message", "type", "param", "code"} <= set(err)
