"""The router's aiohttp application: OpenAI routes in front of a fleet of replicas.

Routes: POST /v1/chat/completions, POST /v1/completions (streamed or not), GET /v1/models (union of
healthy replicas' models), GET /health, GET /metrics; /admin/* and live reload come from `router.admin`
and `router.reload`. Anything else is a 404 in OpenAI's error format.
Everything the app needs is built here and passed down; nothing lives in module globals.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from aiohttp import web

from config.http_guard import BodyError, install_json_protocol_errors, read_json_object
from config.router import RouterConfig
from router.auth import install_access_control
from router.dispatch import REQUEST_ID_HEADER, Dispatcher, DispatchSettings
from router.errors import error_response
from router.features.hashing import HashingConfig
from router.features.parse import FeatureError, Kind, features_from_body
from router.metrics import RouterMetrics
from router.policies.registry import create_policy
from router.proxy.upstream import Timeouts
from router.replicas.health import HealthConfig, HealthTracker
from router.replicas.poller import ReplicaPoller
from router.replicas.state import ReplicaRegistry, ReplicaState
from router.tracing import Tracing, from_env

if TYPE_CHECKING:
    from router.kv_events.prefix_source import PrefixSource

log = logging.getLogger("router")


@dataclass
class Router:
    config: RouterConfig
    registry: ReplicaRegistry
    metrics: RouterMetrics
    hashing: HashingConfig
    dispatcher: Dispatcher | None = None
    tracing: Tracing | None = None
    poller: ReplicaPoller | None = None
    draining: bool = False
    in_flight: int = 0
    kv_events: PrefixSource | None = None  # exact prefix matches from KV events (kv_events.enabled)


ROUTER = web.AppKey("router", Router)
REQUEST_ID = web.RequestKey("request_id", str)
BODY = web.RequestKey("body", dict)
GENERATE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def health_config(cfg: RouterConfig) -> HealthConfig:
    h = cfg.health
    return HealthConfig(failures_to_eject=h.failures_to_eject, checks_to_eject=h.checks_to_eject,
                        base_ejection_s=h.base_ejection_s, max_ejection_s=h.max_ejection_s,
                        successes_to_readmit=h.successes_to_readmit)


def dispatch_settings(cfg: RouterConfig) -> DispatchSettings:
    """The dispatcher's view of ``cfg``; also rebuilt by `router.reload` on every config change."""
    t = cfg.timeouts
    return DispatchSettings(timeouts=Timeouts(t.connect_s, t.first_byte_s, t.idle_s, t.total_s),
                            max_attempts=cfg.retry.max_attempts,
                            retry_statuses=frozenset(cfg.retry.retry_statuses),
                            budget_ratio=cfg.retry.budget_ratio, budget_min_retries=cfg.retry.budget_min_retries,
                            budget_window_s=cfg.retry.budget_window_s,
                            stale_after_s=cfg.load.stale_after_s, replica_header=cfg.replica_header)


def runner_kwargs(cfg: RouterConfig) -> dict[str, Any]:
    """Server settings fixed at start-up (for `web.AppRunner`, or `TestServer.start_server`): close
    connections that do not complete their request headers within client_timeouts.header_s (aiohttp's
    keep-alive timer also runs from the moment a connection opens). Run with handler_cancellation=True."""
    return {"keepalive_timeout": cfg.client_timeouts.header_s}


def harden(runner: web.BaseRunner) -> None:
    """After `runner.setup()`: aiohttp's protocol-level errors (bad request line, header floods, bad
    chunking) answer in OpenAI's JSON error format."""
    install_json_protocol_errors(runner)


def build_registry(cfg: RouterConfig) -> ReplicaRegistry:
    registry = ReplicaRegistry()
    for rc in cfg.replicas:
        registry.add(ReplicaState(name=rc.name, url=rc.url, models=frozenset(rc.models), weight=rc.weight,
                                  labels=dict(rc.labels), health=HealthTracker(health_config(cfg))))
    return registry


@web.middleware
async def request_ids_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get(REQUEST_ID_HEADER, "")
    if not (0 < len(rid) <= 128 and rid.isascii() and rid.isprintable()):  # echoed and logged: keep sane
        rid = uuid.uuid4().hex
    request[REQUEST_ID] = rid
    try:
        resp = await handler(request)
    except web.HTTPNotFound:
        resp = error_response(f"no route for {request.method} {request.path}", 404)
    except web.HTTPMethodNotAllowed:
        resp = error_response(f"method {request.method} not allowed on {request.path}", 405)
    except web.HTTPRequestEntityTooLarge:
        resp = error_response(f"request body too large (limit {request.client_max_size} bytes)", 413)
    except web.HTTPException as exc:
        resp = error_response(exc.reason or "error", exc.status)
    except Exception:
        log.exception("unhandled error rid=%s %s %s", rid, request.method, request.path)
        resp = error_response("internal router error", 500)
    if not resp.prepared:
        resp.headers.setdefault(REQUEST_ID_HEADER, rid)
    return resp


@web.middleware
async def read_body_first(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read and parse a generation request's body before admission (see `install_access_control`): a
    client that sends its body slowly holds no in-flight slot, and is cut after client_timeouts.body_s."""
    if request.method == "POST" and request.path in GENERATE_PATHS:
        try:
            request[BODY] = await read_json_object(request, request.app[ROUTER].config.client_timeouts.body_s)
        except BodyError as exc:
            return await exc.respond_and_close(request, {REQUEST_ID_HEADER: request[REQUEST_ID]})
    return await handler(request)


async def _generate(request: web.Request, kind: Kind, path: str) -> web.StreamResponse:
    router = request.app[ROUTER]
    if router.draining:
        return error_response("router is shutting down", 503)
    body = request.get(BODY)
    if body is None:  # a path spelled differently from the route (the middleware keys on the path)
        try:
            body = await read_json_object(request, router.config.client_timeouts.body_s)
        except BodyError as exc:
            return exc.response()
    try:
        session = request.headers.get(router.config.session_header) if router.config.session_header else None
        features = features_from_body(body, kind, request[REQUEST_ID], router.hashing, affinity_key=session)
    except FeatureError as exc:
        return error_response(exc.message, 400, param=exc.param)
    if router.kv_events is not None:  # lazy: tokenized only if the policy asks
        features = dataclasses.replace(features, kv_match=router.kv_events.for_request(body, kind))
    known = router.registry.models()
    if known and features.model not in known and not router.registry.eligible(features.model, time.monotonic()):
        return error_response(f"The model `{features.model}` does not exist.", 404, param="model",
                              code="model_not_found")
    assert router.dispatcher is not None
    router.in_flight += 1
    try:
        return await router.dispatcher.handle(request, path, body, features)
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
    now = time.monotonic()
    for r in router.registry.all():
        router.metrics.healthy.labels(r.name).set(1 if r.health.admits(now) else 0)
        router.metrics.in_flight.labels(r.name).set(r.in_flight_requests)
    return web.Response(body=router.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(cfg: RouterConfig, *, config_file: str | Path | None = None,
               config_source: Callable[[], RouterConfig] | None = None,
               tracing: Tracing | None | Literal["env"] = "env") -> web.Application:
    """config_file: watched for live reload; config_source: rebuilds the config on reload (default: load
    config_file). Without either, only the admin API changes the config at runtime. tracing: "env" = as
    OTEL_TRACES_EXPORTER says (`router.tracing`), None = off, or a ready `Tracing` (tests)."""
    owned = tracing == "env"
    tracing = from_env() if tracing == "env" else tracing
    registry = build_registry(cfg)
    router = Router(config=cfg, registry=registry, metrics=RouterMetrics(),
                    hashing=HashingConfig(block_chars=cfg.hashing.block_chars), tracing=tracing)
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[request_ids_and_errors])
    app[ROUTER] = router
    install_access_control(app, lambda: router.config, router.metrics,  # API keys, body, limits
                           before_admission=read_body_first)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # One pooled session for all upstream calls; no total timeout here (streams are long-lived).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                        auto_decompress=False)
        policy = create_policy(cfg.policy.name, **cfg.policy.policy_kwargs())
        for r in registry.all():
            policy.on_replica_added(r.name)
        router.dispatcher = Dispatcher(registry, policy, session, router.metrics, dispatch_settings(cfg),
                                       tracing)
        # Probes get their own small pool: aiohttp reuses the longest-idle connection first, so probes
        # sharing the request pool would keep every connection of a past burst alive forever.
        probe_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=4, keepalive_timeout=30),
                                              timeout=aiohttp.ClientTimeout(total=None))
        router.poller = ReplicaPoller(registry, probe_session, health_interval_s=cfg.health.check_interval_s,
                                      load_interval_s=cfg.load.poll_interval_s,
                                      timeout_s=cfg.health.check_timeout_s,
                                      on_transition=lambda r, t: _on_transition(router, r.name, t.new))
        await router.poller.start()
        yield
        await router.poller.stop()
        await probe_session.close()
        await session.close()
        if owned and tracing is not None:
            tracing.provider.shutdown()  # flushes the batch of spans not exported yet

    app.cleanup_ctx.append(lifecycle)
    if cfg.kv_events.enabled:
        app.cleanup_ctx.append(kv_events_context(router))
    from router.admin import setup_admin  # late: admin and reload import this module
    from router.discovery import setup_discovery
    from router.reload import Reloader

    reloader = Reloader(router, path=config_file, source=config_source)
    setup_admin(app, reloader)  # after lifecycle
    setup_discovery(app, cfg, reloader)  # after admin: applies through the reloader
    return app


def kv_events_context(router: Router) -> Callable[[web.Application], AsyncIterator[None]]:
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


def _on_transition(router: Router, name: str, new_state: str) -> None:
    log.warning("replica %s is now %s", name, new_state)
    if new_state == "ejected":
        router.metrics.ejections.labels(name).inc()
