"""The router's aiohttp application: OpenAI routes in front of a fleet of replicas.

Routes: POST /v1/chat/completions, POST /v1/completions (streamed or not), GET /v1/models (union of
healthy replicas' models), GET /health, GET /metrics; /admin/* and live reload come from `router.admin`
and `router.reload`; POST on each of the config's `passthrough_paths` (embeddings, score, rerank) is
forwarded as it came to a replica serving its model. Anything else is a 404 in OpenAI's error format.
The router itself (replicas, policy, dispatcher, poller) is built by `router.runtime`; this module adds
the HTTP surface and wires the admin API, reload and discovery to it. Nothing lives in module globals.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from config.router import RouterConfig
from openai_http import (
    REQUEST_ID,
    REQUEST_ID_HEADER,
    BodyError,
    install_json_protocol_errors,
    parse_json_object,
    read_body,
    request_id_and_errors,
)
from router import runtime
from router.admin import setup_admin
from router.auth import install_access_control
from router.discovery import setup_discovery
from router.errors import error_response
from router.features.other import passthrough_features
from router.features.parse import FeatureError, Kind, RequestFeatures, features_from_body
from router.reload import Reloader
from router.runtime import ROUTER
from router.tracing import Tracing, from_env

log = logging.getLogger("router")


BODY = web.RequestKey("body", dict)
RAW_BODY = web.RequestKey("raw_body", bytes)  # BODY's bytes, forwarded as they came when nothing changes
GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def runner_kwargs(cfg: RouterConfig) -> dict[str, Any]:
    """Server settings fixed at start-up (for `web.AppRunner`, or `TestServer.start_server`): close
    connections that do not complete their request headers within client_timeouts.header_s (aiohttp's
    keep-alive timer also runs from the moment a connection opens). Run with handler_cancellation=True."""
    return {"keepalive_timeout": cfg.client_timeouts.header_s}


def harden(runner: web.BaseRunner) -> None:
    """After `runner.setup()`: aiohttp's protocol-level errors (bad request line, header floods, bad
    chunking) answer in OpenAI's JSON error format."""
    install_json_protocol_errors(runner)


@web.middleware
async def read_body_first(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read and parse a generation request's body before admission (see `install_access_control`): a
    client that sends its body slowly holds no in-flight slot, and is cut after client_timeouts.body_s."""
    if request.method == "POST" and (request.path in GENERATE_PATHS
                                     or request.path in request.app[ROUTER].config.passthrough_paths):
        try:
            raw = await read_body(request, request.app[ROUTER].config.client_timeouts.body_s)
            request[BODY] = parse_json_object(raw)
            request[RAW_BODY] = raw
        except BodyError as exc:
            return await exc.respond_and_close(request, {REQUEST_ID_HEADER: request[REQUEST_ID]})
    return await handler(request)


FeaturesOf = Callable[["runtime.Router", dict[str, Any], bytes], RequestFeatures]  # may raise FeatureError


async def _generate(request: web.Request, kind: Kind, path: str) -> web.StreamResponse:
    def features_of(router: runtime.Router, body: dict[str, Any], raw: bytes) -> RequestFeatures:
        session = request.headers.get(router.config.session_header) if router.config.session_header else None
        features = features_from_body(body, kind, request[REQUEST_ID], router.hashing, affinity_key=session)
        if router.kv_events is not None:  # lazy: tokenized only if the policy asks
            features = dataclasses.replace(features, kv_match=router.kv_events.for_request(body, kind))
        return features

    return await _route(request, path, features_of)


async def passthrough(request: web.Request) -> web.StreamResponse:
    """POST on one of `passthrough_paths` (embeddings, score, rerank, ...): the body goes to a replica
    serving its model as it came, placed by load (`router.features.other`), with the same retries,
    timeouts and relaying as a generation request."""
    def features_of(router: runtime.Router, body: dict[str, Any], raw: bytes) -> RequestFeatures:
        return passthrough_features(body, len(raw), request[REQUEST_ID], router.hashing)

    return await _route(request, request.path, features_of)


async def _route(request: web.Request, path: str, features_of: FeaturesOf) -> web.StreamResponse:
    """Body (as `read_body_first` read it) -> features -> the dispatcher, or the error response."""
    router = request.app[ROUTER]
    if router.draining:
        return error_response("router is shutting down", 503)
    body, raw = request.get(BODY), request.get(RAW_BODY)
    if body is None or raw is None:  # a path spelled differently from the route (the middleware keys on it)
        try:
            raw = await read_body(request, router.config.client_timeouts.body_s)
            body = parse_json_object(raw)
        except BodyError as exc:
            return exc.response()
    try:
        features = features_of(router, body, raw)
    except FeatureError as exc:
        return error_response(exc.message, 400, param=exc.param)
    # An unknown model is a 404 (if some replica is up): asked only when no replica takes it now, so the
    # usual request costs one look at the cached serving list instead of a sorted union of all models.
    if (not router.registry.eligible(features.model, time.monotonic())
            and (known := router.registry.models()) and features.model not in known):
        return error_response(f"The model `{features.model}` does not exist.", 404, param="model",
                              code="model_not_found")
    assert router.dispatcher is not None
    router.in_flight += 1
    try:
        return await router.dispatcher.handle(request, path, body, features, raw)
    finally:
        router.in_flight -= 1


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat", "/v1/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion", "/v1/completions")


async def models(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    now = int(time.time())
    data = [{"id": m, "object": "model", "created": now, "owned_by": "router"} for m in router.registry.models()]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    if router.draining:
        return error_response("draining", 503)
    healthy = router.registry.eligible(None, time.monotonic())
    if not healthy:
        return error_response("no healthy replica", 503)
    return web.json_response({"status": "ok", "healthy_replicas": len(healthy)})


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    router.metrics.mirror_replicas(router.registry.all(), time.monotonic())
    return web.Response(body=router.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(cfg: RouterConfig, *, config_file: str | Path | None = None,
               config_source: Callable[[], RouterConfig] | None = None,
               tracing: Tracing | None | Literal["env"] = "env") -> web.Application:
    """config_file: watched for live reload; config_source: rebuilds the config on reload (default: load
    config_file). Without either, only the admin API changes the config at runtime. tracing: "env" = as
    OTEL_TRACES_EXPORTER says (`router.tracing`), None = off, or a ready `Tracing` (tests)."""
    owned = tracing == "env"
    router = runtime.new_router(cfg, from_env() if tracing == "env" else tracing)
    app = web.Application(client_max_size=cfg.max_body_bytes,
                          middlewares=[request_id_and_errors(log, "internal router error")])
    app[ROUTER] = router
    install_access_control(app, lambda: router.config, router.metrics,  # API keys, body, limits
                           before_admission=read_body_first)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    for path in cfg.passthrough_paths:
        app.router.add_post(path, passthrough)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await runtime.start(router)
        yield
        await runtime.stop(router)
        if owned and router.tracing is not None:
            router.tracing.provider.shutdown()  # flushes the batch of spans not exported yet

    app.cleanup_ctx.append(lifecycle)
    if cfg.kv_events.enabled:
        app.cleanup_ctx.append(kv_events_context(router))
    reloader = Reloader(router, path=config_file, source=config_source)
    setup_admin(app, reloader)  # after lifecycle
    setup_discovery(app, cfg, reloader)  # after admin: applies through the reloader
    return app


def kv_events_context(router: runtime.Router) -> Callable[[web.Application], AsyncIterator[None]]:
    """Follow the replicas' KV events while the app runs (`router.kv_events.live`); the set of replicas
    followed tracks the registry, so reloads and discovery need no hook."""
    async def context(_: web.Application) -> AsyncIterator[None]:
        from router.kv_events.live import running

        replicas = lambda: [(r.name, r.url) for r in router.registry.all()]  # noqa: E731
        async with running(router.config.kv_events, replicas, router.metrics.registry) as live:
            router.kv_events = live.source
            yield
            router.kv_events = None
    return context

