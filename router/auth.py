"""API keys: who may call the OpenAI routes and the admin API.

Keys come from `auth.api_keys` and `auth.admin_keys` (inline, env var or file; see config/router.py) and
are sent as `Authorization: Bearer <key>`. With no key configured auth is off and every route is open.
With keys:

- /health and /metrics stay open: probes and scrapers carry no keys.
- /admin and /admin/* need an admin key: no key or an unknown one -> 401, a valid user key -> 403.
- Every other path needs a user or admin key -> else 401 `invalid_api_key`. Default deny, so a route
  added later is never open by accident.

Errors use OpenAI's format; 401s carry `WWW-Authenticate: Bearer`.

Lookup is constant time in the secret. The presented key is hashed with SHA-256 and the digest looked
up in a dict of the configured keys' digests. Timing then depends only on the digest, and steering a
digest towards a stored one takes a SHA-256 preimage, so timing reveals nothing about key bytes. That is
the guarantee of hmac.compare_digest against every key, without a cost that grows with the key count.

Keys are never logged, echoed in errors or put in metrics. A key is known by its configured name.
The key table follows the live config and is rebuilt when `config()` returns a new object (a reload),
which re-reads env and file keys: that is how keys rotate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from config.router import RouterConfig
from router.errors import error_response
from router.limits import (
    CALLER,
    LIMITER,
    Caller,
    Handler,
    Limiter,
    Middleware,
    effective_limits,
    limits_middleware,
    route_paths,
)
from router.metrics import RouterMetrics

log = logging.getLogger("router.auth")

OPEN_PATHS = frozenset({"/health", "/metrics"})
PathKind = Literal["open", "admin", "key"]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def bearer_token(header: str | None) -> str | None:
    """The key from an `Authorization: Bearer <key>` header (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def path_kind(request: web.Request) -> PathKind:
    paths = route_paths(request)
    if any(p == "/admin" or p.startswith("/admin/") for p in paths):
        return "admin"
    return "open" if all(p in OPEN_PATHS for p in paths) else "key"


@dataclass(frozen=True, slots=True)
class KeyTable:
    """SHA-256 digest of each configured key -> its `Caller` (name, role, effective limits)."""

    enabled: bool
    callers: dict[bytes, Caller]

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> KeyTable:
        defaults = cfg.limits.default_key_limits
        callers = {_digest(spec.secret()): Caller(name=name, admin=admin, limits=effective_limits(spec, defaults))
                   for name, admin, spec in cfg.auth.named_keys()}
        return cls(enabled=cfg.auth.enabled, callers=callers)

    @property
    def names(self) -> set[str]:
        return {c.name for c in self.callers.values()}

    def lookup(self, key: str | None) -> Caller | None:
        return self.callers.get(_digest(key)) if key is not None else None


@dataclass(frozen=True, slots=True)
class Denial:
    """A refused request: `reason` is the metric label, `key` the caller's name ("" if none was valid)."""

    status: int
    reason: str
    message: str
    key: str = ""

    def response(self) -> web.Response:
        if self.status == 401:
            return error_response(self.message, 401, code="invalid_api_key",
                                  headers={"WWW-Authenticate": 'Bearer realm="router"'})
        return error_response(self.message, self.status, code="admin_key_required")


class Authenticator:
    """Checks requests against the key table of the live config; counts and logs refusals."""

    def __init__(self, config: Callable[[], RouterConfig], metrics: RouterMetrics,
                 on_rebuild: Callable[[Collection[str]], None] | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._on_rebuild = on_rebuild
        self._cfg: RouterConfig | None = None
        self._table = KeyTable(enabled=False, callers={})

    def table(self) -> KeyTable:
        cfg = self._config()
        if cfg is not self._cfg:
            self._table, self._cfg = KeyTable.from_config(cfg), cfg
            if self._on_rebuild is not None:
                self._on_rebuild(self._table.names)
        return self._table

    def check(self, request: web.Request, *, admin: bool) -> Caller | Denial | None:
        """The caller, a Denial, or None when auth is off."""
        table = self.table()
        if not table.enabled:
            return None
        key = bearer_token(request.headers.get("Authorization"))
        caller = table.lookup(key)
        if caller is None:
            message = ("Incorrect API key provided." if key is not None else
                       "Missing API key: send it as `Authorization: Bearer <key>`.")
            return self._deny(request, Denial(401, "invalid_key" if key is not None else "missing_key", message))
        if admin and not caller.admin:
            return self._deny(request, Denial(403, "forbidden", "This API key cannot use the admin API; "
                                              "an admin key is needed.", key=caller.name))
        return caller

    def _deny(self, request: web.Request, denial: Denial) -> Denial:
        self._metrics.rejected.labels(denial.reason, denial.key).inc()
        # Debug only: a flood of bad keys must not flood the log. Never the key itself.
        log.debug("refused %s %s from %s: %s%s", request.method, request.path, request.remote, denial.reason,
                  f" (key {denial.key})" if denial.key else "")
        return denial


AUTH = web.AppKey("auth", Authenticator)


def auth_middleware(auth: Authenticator) -> Middleware:
    """Sets `request[CALLER]` for valid keys, answers 401/403 for the rest; see the module docstring."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = path_kind(request)
        if kind == "open":
            return await handler(request)
        verdict = auth.check(request, admin=kind == "admin")
        if isinstance(verdict, Denial):
            return verdict.response()
        if verdict is not None:
            request[CALLER] = verdict
        return await handler(request)

    return authenticate


def check_admin(request: web.Request) -> web.Response | None:
    """For admin handlers: None when the request may proceed (admin key, or auth off), else the 401/403.

    The middleware already guards /admin/*; this covers admin handlers mounted elsewhere and defence in
    depth. Works from sub-applications (looks the Authenticator up through `config_dict`).
    """
    caller = request.get(CALLER)
    if caller is not None and caller.admin:
        return None
    verdict = request.config_dict[AUTH].check(request, admin=True)
    return verdict.response() if isinstance(verdict, Denial) else None


def install_access_control(app: web.Application, config: Callable[[], RouterConfig], metrics: RouterMetrics,
                           *, clock: Callable[[], float] = time.monotonic,
                           before_admission: Middleware | None = None) -> None:
    """Append the auth then the limits middleware to `app` (before it starts). Both read `config()` on
    every request, so a reload that swaps the config object changes keys and limits at once.
    `before_admission` runs between them: for an authenticated request that holds no slot yet (the
    router reads the body there, so a slow sender never occupies an in-flight slot)."""
    limiter = Limiter(clock)
    auth = Authenticator(config, metrics, on_rebuild=limiter.retain)
    app[LIMITER] = limiter
    app[AUTH] = auth
    app.middlewares.append(auth_middleware(auth))
    if before_admission is not None:
        app.middlewares.append(before_admission)
    app.middlewares.append(limits_middleware(limiter, config, metrics))
