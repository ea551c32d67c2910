"""The admin API: look at the fleet, change it at runtime, reload the config. JSON; errors in OpenAI format.

Routes (all admin-only, see `_admin_guard`):

- ``GET    /admin/replicas``               every replica: health, in-flight, load, hit rates, index size;
  replicas removed by a reload but still finishing requests are listed with ``"removed": true``
- ``POST   /admin/replicas``               add one: ``{"name", "url", "models"?, "weight"?, "labels"?}``
- ``POST   /admin/replicas/{name}/drain``  no new requests; in-flight ones finish
- ``POST   /admin/replicas/{name}/undrain`` take new requests again (clears the admin drain only)
- ``DELETE /admin/replicas/{name}``        drain and remove
- ``GET    /admin/config``                 the effective config, secrets redacted
- ``POST   /admin/reload``                 reload the config file now (with ``--workers``: every worker)

Adding and removing go through `Reloader.update`, like a file reload: the change is validated the same
way, bumps the config generation and shows in ``GET /admin/config``. It is NOT written back to the file,
so the next reload from the file (file change, SIGHUP, ``POST /admin/reload``) puts the file's replica
list back. A drain is replica state, not config: it survives reloads while the replica stays.

With ``--workers N`` a request reaches the one worker its connection landed on: a reload, an added or
removed replica and a drain then go on to the other live workers (`router.siblings`; the answer says
``"other_workers": ...``), while the views show that worker's state (``"worker"`` in
``GET /admin/config`` says which one).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from config.router import ConfigError, ReplicaConfig, RouterConfig, describe
from router import siblings
from router.auth import check_admin
from router.errors import error_response
from router.policies.base import Policy
from router.reload import RELOADER, ConfigEdit, Reloader
from router.replicas.state import ReplicaState
from router.runtime import ROUTER, Router
from router.worker_metrics import WORKER_ENV

log = logging.getLogger("router.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SECRET_NAME = re.compile(r"(key|secret|token|password|credential)s?$", re.IGNORECASE)
_KEEP_UNDER_SECRET = frozenset({"name", "env", "file"})  # where a key comes from, not the key
REDACTED = "***"


def _admin_guard(request: web.Request) -> web.StreamResponse | None:
    """None if the caller may use the admin API, else the refusal to send.

    `router.auth.check_admin` decides first (admin keys: 401 without one, 403 for a user key). When no
    admin key is configured it lets everyone through, so then only loopback clients are let in: the
    admin API can remove the whole fleet and must not be open to the network by default. Behind a
    reverse proxy every client looks like the proxy: configure an admin key there.
    """
    denied = check_admin(request)
    if denied is not None:
        return denied
    cfg = request.app[ROUTER].config
    if not cfg.auth.admin_keys and not is_loopback(request.remote):
        return error_response("the admin API answers only loopback clients while no admin key is "
                              "configured (auth.admin_keys)", 403, code="admin_loopback_only")
    return browser_guard(request, cfg)


MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def _host_name(host: str) -> str:
    """The name part of a Host header value: ``[::1]:8000`` -> ``::1``, ``Example:80`` -> ``example``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def browser_guard(request: web.Request, cfg: RouterConfig) -> web.StreamResponse | None:
    """Refuse what only a browser tricked by a web page would send (CSRF, DNS rebinding):

    - a cross-origin request: an ``Origin`` that is neither the origin the request was sent to (its
      Host) nor listed in ``admin.allowed_origins`` -> 403;
    - without admin keys, a ``Host`` that is not a loopback name or address, nor listed in
      ``admin.allowed_hosts`` (a rebound DNS name pointing at 127.0.0.1) -> 403;
    - a mutating request whose body is not ``application/json`` (HTML forms and simple cross-site
      requests can only send form or text types) -> 415. Bodyless POSTs (drain, reload) need no type,
      unless they claim a form type.
    """
    host = request.headers.get("Host")
    origin = request.headers.get("Origin")
    if origin is not None and origin not in cfg.admin.allowed_origins:
        scheme, _, rest = origin.partition("://")
        if host is None or rest.lower() != host.lower() or scheme not in ("http", "https"):
            return error_response(f"cross-origin request refused (Origin {origin[:100]!r}); list trusted "
                                  "origins in admin.allowed_origins", 403, code="admin_cross_origin")
    if host is not None and not cfg.auth.admin_keys:
        name = _host_name(host)
        if (name not in LOOPBACK_NAMES and not name.endswith(".localhost") and not is_loopback(name)
                and name not in {h.lower() for h in cfg.admin.allowed_hosts}):
            return error_response(f"Host {host[:100]!r} is not a loopback name; add it to admin.allowed_hosts "
                                  "(or configure an admin key)", 403, code="admin_host_refused")
    form_type = request.content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
    if request.method in MUTATING and request.content_type != "application/json" and (request.body_exists
                                                                                       or form_type):
        return error_response("the admin API takes application/json bodies only", 415,
                              code="unsupported_media_type")
    return None


def is_loopback(remote: str | None) -> bool:
    """``request.remote`` is a loopback address (IPv4, IPv6, or IPv4-mapped IPv6)."""
    try:
        ip = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:  # None, or a unix socket peer: not an IP
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def admin_only(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        denied = _admin_guard(request)
        return denied if denied is not None else await handler(request)

    return guarded


# -- views -----------------------------------------------------------------------------------------


def index_size(policy: Policy, name: str) -> int | None:
    """Prefix-index blocks the policy holds for ``name``, if it has an index (optional ``index_size``)."""
    hook = getattr(policy, "index_size", None)
    return hook(name) if callable(hook) else None


def calibration(policy: Policy, name: str) -> dict[str, Any] | None:
    """The policy's learned timing for ``name`` (optional ``calibration`` hook, the cost policy's)."""
    hook = getattr(policy, "calibration", None)
    return hook(name) if callable(hook) else None


def replica_json(replica: ReplicaState, policy: Policy | None, now: float, *, removed: bool = False
                 ) -> dict[str, Any]:
    h, load = replica.health, replica.load
    load_json = None
    if load is not None:
        queries, hits = load.prefix_cache_queries, load.prefix_cache_hits
        load_json = {"age_s": round(max(0.0, now - load.received_at), 3), "running": load.running,
                     "waiting": load.waiting, "kv_usage": load.kv_usage,
                     "kv_blocks_used": load.kv_blocks_used, "kv_blocks_total": load.kv_blocks_total,
                     "block_size": load.block_size,
                     "engine_prefix_cache_hit_rate": hits / queries if queries else None}
    return {
        "name": replica.name, "url": replica.url, "models": sorted(replica.models),
        "discovered_models": sorted(replica.discovered_models), "weight": replica.weight,
        "labels": replica.labels, "removed": removed,
        "health": {"state": h.state, "admitted": not removed and h.admits(now), "draining": h.draining,
                   "ejections": h.ejections, "last_failure": h.last_failure},
        "in_flight_requests": replica.in_flight_requests, "in_flight_tokens": replica.in_flight_tokens,
        "load": load_json,
        "cache_hit_rate": replica.cache_hit_rate, "prompt_tokens_total": replica.prompt_tokens_total,
        "cached_tokens_total": replica.cached_tokens_total,
        "index_blocks": None if removed or policy is None else index_size(policy, replica.name),
        "calibration": None if removed or policy is None else calibration(policy, replica.name),
    }


def redact(value: Any, secret: bool = False) -> Any:
    """``value`` (a JSON-mode dump) with every string under a field named like key/secret/token/password
    replaced by "***". Numbers stay (``prefill_s_per_token`` is no secret), and so do the ``name``,
    ``env`` and ``file`` that say where a key comes from."""
    if isinstance(value, dict):
        return {k: redact(v, False if k in _KEEP_UNDER_SECRET else secret or bool(_SECRET_NAME.search(k)))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secret) for v in value]
    return REDACTED if secret and isinstance(value, str) else value


# -- handlers --------------------------------------------------------------------------------------


def _reloader(request: web.Request) -> Reloader:
    return request.app[RELOADER]


def _result_error(reloader: Reloader, error: str | None) -> web.Response:
    return error_response(f"config change refused, still running generation {reloader.generation}: {error}",
                          400, code="invalid_config")


@admin_only
async def list_replicas(request: web.Request) -> web.Response:
    router, reloader = request.app[ROUTER], _reloader(request)
    reloader.prune()
    now = time.monotonic()
    policy = router.dispatcher.policy if router.dispatcher else None
    data = [replica_json(r, policy, now) for r in router.registry.all()]
    data += [replica_json(r, None, now, removed=True) for r in reloader.retired]
    return web.json_response({"object": "list", "generation": reloader.generation, "data": data})


@admin_only
async def add_replica(request: web.Request) -> web.Response:
    router, reloader = request.app[ROUTER], _reloader(request)
    try:
        body = await request.json()
    except ValueError as exc:
        return error_response(f"request body is not valid JSON: {exc}", 400)
    try:
        spec = ReplicaConfig.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        return error_response(describe(exc), 400, param=".".join(map(str, first)) or None)
    if spec.name in router.registry:
        return error_response(f"replica {spec.name!r} already exists", 400, param="name",
                              code="replica_exists")
    result = await reloader.update(_with_replica(spec), "admin")
    if not result.ok:
        return _result_error(reloader, result.error)
    replica = router.registry.get(spec.name)
    assert replica is not None
    policy = router.dispatcher.policy if router.dispatcher else None
    return web.json_response({"generation": result.generation,
                              "replica": replica_json(replica, policy, time.monotonic()),
                              **_tell_siblings({"op": "add", "replica": spec.model_dump(mode="json")})},
                             status=201)


def _with_replica(spec: ReplicaConfig) -> ConfigEdit:
    def edit(cfg: RouterConfig) -> RouterConfig:
        if any(r.name == spec.name for r in cfg.replicas):
            raise ConfigError(f"replicas: replica name {spec.name!r} is used twice")
        return cfg.model_copy(update={"replicas": (*cfg.replicas, spec)})
    return edit


def _without_replica(name: str) -> ConfigEdit:
    def edit(cfg: RouterConfig) -> RouterConfig:
        return cfg.model_copy(update={"replicas": tuple(r for r in cfg.replicas if r.name != name)})
    return edit


def _tell_siblings(change: dict[str, Any]) -> dict[str, str]:
    """With ``--workers``: pass an applied change to the other workers (`router.siblings`); the answer
    then says so. A single router answers as before."""
    return {"other_workers": "applying"} if siblings.tell(change) else {}


def _known(request: web.Request) -> tuple[ReplicaState | None, web.Response | None]:
    name = request.match_info["name"]
    replica = request.app[ROUTER].registry.get(name)
    if replica is None:
        return None, error_response(f"no replica named {name!r}", 404, param="name", code="replica_not_found")
    return replica, None


async def _set_drain(request: web.Request, draining: bool) -> web.Response:
    replica, missing = _known(request)
    if replica is None:
        assert missing is not None
        return missing
    replica.health.set_draining(draining, source="admin")
    router = request.app[ROUTER]
    policy = router.dispatcher.policy if router.dispatcher else None
    return web.json_response({"replica": replica_json(replica, policy, time.monotonic()),
                              **_tell_siblings({"op": "drain", "name": replica.name, "draining": draining})})


@admin_only
async def drain_replica(request: web.Request) -> web.Response:
    return await _set_drain(request, True)


@admin_only
async def undrain_replica(request: web.Request) -> web.Response:
    return await _set_drain(request, False)


@admin_only
async def remove_replica(request: web.Request) -> web.Response:
    replica, missing = _known(request)
    if replica is None:
        assert missing is not None
        return missing
    name, reloader = replica.name, _reloader(request)
    result = await reloader.update(_without_replica(name), "admin")
    if not result.ok:
        return _result_error(reloader, result.error)
    return web.json_response({"generation": result.generation, "removed": name,
                              "in_flight_requests": replica.in_flight_requests,
                              **_tell_siblings({"op": "remove", "name": name})})


@admin_only
async def show_config(request: web.Request) -> web.Response:
    reloader = _reloader(request)
    last = reloader.last.as_json() if reloader.last is not None else None
    worker = {"worker": {"index": int(os.environ[WORKER_ENV]), "pid": os.getpid()}} if WORKER_ENV in os.environ else {}
    return web.json_response({
        **worker,
        "generation": reloader.generation,
        "config_file": str(reloader.path) if reloader.path is not None else None,
        "config": redact(request.app[ROUTER].config.model_dump(mode="json")),
        "last_change": last,
    })


@admin_only
async def reload_config(request: web.Request) -> web.Response:
    reloader = _reloader(request)
    if not reloader.can_reload:
        return error_response("the router was started without a config file; nothing to reload", 400,
                              code="no_config_file")
    result = await reloader.reload("api")
    if not result.ok:
        return _result_error(reloader, result.error)
    return web.json_response({**result.as_json(), **_tell_siblings({"op": "reload"})})


async def apply_sibling_change(router: Router, reloader: Reloader, change: dict[str, Any]) -> None:
    """Apply a change another worker applied and passed on (`_tell_siblings`), the way it did; a refusal
    is logged and counted (``router_config_reloads_total{result="error"}``) like any other."""
    op, name = change.get("op"), str(change.get("name", ""))
    if op == "reload":
        await reloader.reload("api")
    elif op == "add":
        await reloader.update(_with_replica(ReplicaConfig.model_validate(change.get("replica"))), "admin")
    elif op == "remove":
        await reloader.update(_without_replica(name), "admin")
    elif op == "drain" and (replica := router.registry.get(name)) is not None:
        replica.health.set_draining(bool(change.get("draining")), source="admin")
    else:
        log.warning("change from another worker not applied (unknown, or no replica %r here): %r", name, change)


def setup_admin(app: web.Application, reloader: Reloader) -> None:
    """Install the reloader (its watch task starts with the app) and the /admin routes.
    Call after the router's own cleanup_ctx, so the watch starts after the dispatcher exists."""
    app[RELOADER] = reloader
    app.cleanup_ctx.append(reloader.context)
    app.router.add_get("/admin/replicas", list_replicas)
    app.router.add_post("/admin/replicas", add_replica)
    app.router.add_post("/admin/replicas/{name}/drain", drain_replica)
    app.router.add_post("/admin/replicas/{name}/undrain", undrain_replica)
    app.router.add_delete("/admin/replicas/{name}", remove_replica)
    app.router.add_get("/admin/config", show_config)
    app.router.add_post("/admin/reload", reload_config)
