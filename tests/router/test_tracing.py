"""OpenTelemetry tracing: spans of a routed request, traceparent to the engine, off means nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk (otel/dev extra) is not installed")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from config.logging_setup import JsonFormatter  # noqa: E402
from config.router import parse_config  # noqa: E402
from engine_server.app import create_app as create_engine_app  # noqa: E402
from engine_server.sim.backend import SimBackend, SimConfig  # noqa: E402
from engine_server.sim.faults import FaultConfig  # noqa: E402
from router.app import create_app  # noqa: E402
from router.tracing import Tracing, TracingUnavailable, check_env, from_env, requested_exporter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "You are the support assistant of the Acme rocket company. Answer precisely. " * 12
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{INCOMING_TRACE}-00f067aa0ba902b7-01"

Start = Callable[..., Awaitable[tuple[TestServer, list[dict[str, str]]]]]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def routed(exporter: InMemorySpanExporter) -> AsyncIterator[Start]:
    """A router (tracing on or off) in front of one sim engine that records each request's headers."""
    servers: list[TestServer] = []

    async def start(traced: bool = True, n: int = 1, **faults: float) -> tuple[TestServer, list[dict[str, str]]]:
        seen: list[dict[str, str]] = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST":
                seen.append({k.lower(): v for k, v in request.headers.items()})
            return await handler(request)

        replicas = []
        for i in range(n):
            engine_app = create_engine_app(SimBackend(SimConfig(model_name="sim-model", profile="instant",
                                                                faults=FaultConfig(**faults))))
            engine_app.middlewares.append(record)
            engine = TestServer(engine_app, host="127.0.0.1")
            await engine.start_server()
            servers.append(engine)
            replicas.append({"name": f"r{i}", "url": str(engine.make_url("")).rstrip("/")})
        cfg = parse_config({"replicas": replicas,
                            "policy": {"name": "cost"}, "health": {"check_interval_s": 0.2},
                            "load": {"poll_interval_s": 0.1}})
        tracing = None
        if traced:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            tracing = Tracing(provider)
        router = TestServer(create_app(cfg, tracing=tracing), host="127.0.0.1", handler_cancellation=True)
        await router.start_server()
        servers.insert(0, router)
        return router, seen

    yield start
    for s in servers:
        await s.close()


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "sim-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi?"}], **kw}


async def post(router: TestServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as s, \
            s.post(router.make_url("/v1/chat/completions"), json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.text()


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    spans = exporter.get_finished_spans()
    out = {s.name: s for s in spans}
    assert len(out) == len(spans), [s.name for s in spans]
    return out


async def test_a_streamed_request_yields_server_route_and_upstream_spans(
        routed: Start, exporter: InMemorySpanExporter) -> None:
    router, seen = await routed()
    text = await post(router, chat(stream=True))
    assert "[DONE]" in text
    spans = by_name(exporter)
    assert set(spans) == {"POST /v1/chat/completions", "route", "upstream"}
    server, route, upstream = spans["POST /v1/chat/completions"], spans["route"], spans["upstream"]
    trace_id = server.context.trace_id
    assert server.parent is None
    assert route.context.trace_id == upstream.context.trace_id == trace_id
    assert route.parent.span_id == upstream.parent.span_id == server.context.span_id
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["router.stream"] is True
    assert route.attributes["router.policy"] == "cost"
    assert route.attributes["router.replica"] == "r0"
    assert route.attributes["router.reason"]
    assert "router.matched_blocks" in route.attributes
    assert tuple(route.attributes["router.candidates"]) == ("r0",)
    assert upstream.attributes["router.replica"] == "r0"
    assert upstream.attributes["router.attempt"] == 1 and upstream.attributes["router.retry"] is False
    assert upstream.attributes["http.response.status_code"] == 200
    assert upstream.attributes["router.outcome"] == "ok"
    assert upstream.attributes["router.completion_tokens"] > 0
    events = {e.name: e for e in upstream.events}
    assert set(events) == {"first_token", "stream_end"}
    assert events["stream_end"].attributes["router.outcome"] == "ok"
    assert events["stream_end"].attributes["router.prompt_tokens"] > 0
    # The engine got the upstream span's context as its parent.
    (headers,) = seen
    version, sent_trace, sent_parent, _flags = headers["traceparent"].split("-")
    assert (version, sent_trace, sent_parent) == ("00", f"{trace_id:032x}", f"{upstream.context.span_id:016x}")


async def test_an_incoming_traceparent_is_continued(routed: Start, exporter: InMemorySpanExporter) -> None:
    router, seen = await routed()
    await post(router, chat(), headers={"traceparent": INCOMING})
    spans = by_name(exporter)
    server = spans["POST /v1/chat/completions"]
    assert format(server.context.trace_id, "032x") == INCOMING_TRACE
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert seen[0]["traceparent"].split("-")[1] == INCOMING_TRACE
    assert [e.name for e in spans["upstream"].events] == ["response_end"]


async def test_each_attempt_gets_its_route_and_upstream_span(
        routed: Start, exporter: InMemorySpanExporter) -> None:
    router, seen = await routed(n=2, error_rate=1.0)  # every attempt fails: one retry on the other replica
    async with aiohttp.ClientSession() as s, s.post(router.make_url("/v1/chat/completions"), json=chat()) as r:
        assert r.status == 500
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    routes = [s for s in spans if s.name == "route"]
    upstreams = sorted((s for s in spans if s.name == "upstream"), key=lambda s: s.attributes["router.attempt"])
    assert len(routes) == len(upstreams) == len(seen) == 2
    assert [u.attributes["router.retry"] for u in upstreams] == [False, True]
    assert {u.attributes["router.replica"] for u in upstreams} == {"r0", "r1"}
    assert [r.attributes["router.replica"] for r in routes] == [u.attributes["router.replica"] for u in upstreams]
    assert all(u.attributes["http.response.status_code"] == 500 for u in upstreams)
    assert all(u.attributes["router.outcome"] == "status" for u in upstreams)
    assert not server.status.is_ok and server.attributes["http.response.status_code"] == 500
    sent = {h["traceparent"].split("-")[2] for h in seen}
    assert sent == {f"{u.context.span_id:016x}" for u in upstreams}


async def test_tracing_off_adds_no_traceparent_and_records_nothing(
        routed: Start, exporter: InMemorySpanExporter) -> None:
    router, seen = await routed(traced=False)
    await post(router, chat(stream=True))
    await post(router, chat())
    assert len(seen) == 2 and all("traceparent" not in h for h in seen)
    assert exporter.get_finished_spans() == ()


def test_json_logs_carry_the_ids_of_the_current_span() -> None:
    provider = TracerProvider()
    tracing = Tracing(provider)
    record = logging.LogRecord("router", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    span = tracing.tracer.start_span("x")
    with tracing.use(span):
        out = json.loads(JsonFormatter().format(record))
    span.end()
    assert out["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert out["span_id"] == format(span.get_span_context().span_id, "016x")


def test_the_environment_turns_tracing_on() -> None:
    assert requested_exporter({}) is None
    assert requested_exporter({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert from_env({}) is None
    assert requested_exporter({"OTEL_TRACES_EXPORTER": "OTLP"}) == "otlp"
    with pytest.raises(TracingUnavailable, match="zipkin"):
        requested_exporter({"OTEL_TRACES_EXPORTER": "zipkin"})
    tracing = from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "edge-router"})
    assert tracing is not None
    assert tracing.provider.resource.attributes["service.name"] == "edge-router"
    tracing.provider.shutdown()


def test_turning_tracing_on_without_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("opentelemetry.exporter")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter", None)  # import fails as if not installed
    with pytest.raises(TracingUnavailable, match=r"\[otel\]"):
        check_env({"OTEL_TRACES_EXPORTER": "otlp"})
    with pytest.raises(TracingUnavailable, match=r"\[otel\]"):
        from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    check_env({})  # off: nothing is checked


def test_with_tracing_off_opentelemetry_is_never_imported() -> None:
    code = ("import sys, router.app, router.cli, config.logging_setup, router.tracing as t\n"
            "assert t.from_env({}) is None\n"
            "print([m for m in sys.modules if m.startswith('opentelemetry')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
