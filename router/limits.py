"""Admission limits: a router-wide bound on requests in flight, per-key rate and concurrency limits.

Each request to an OpenAI route (/v1/*), after `router.auth` has named its caller, is checked in order:

1. global: `limits.max_in_flight` requests already admitted -> 503 + Retry-After. The fleet is full, not
   the caller over quota, hence 503 rather than 429. Nothing is queued, so memory stays bounded by
   max_in_flight x max_body_bytes however hard clients push.
2. per key, concurrency: `max_concurrent` requests of that key in flight -> 429 + Retry-After.
3. per key, rate: a token bucket refilled at `requests_per_s`, holding at most `burst` tokens, one token
   per request -> 429 with Retry-After = seconds until the next token, rounded up, at least 1.

Checks 1 and 2 take nothing, so a request they refuse does not burn a rate token. Per-key limits need a
caller, so they apply only with auth on. An admitted request holds a `Permit` until `release()`; the
middleware releases it in `finally`, which covers completion, errors and client disconnects (aiohttp
cancels the handler). Streams count until their last byte because the handler returns only then.

`TokenBucket` and `Limiter` are pure (no I/O, time from an injected clock), so tests need no sleeping.
Key state is kept by key name and limits are read from the live config on every request, so a reload
changes limits without resetting buckets or losing the count of streams in flight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from aiohttp import web

from config.router import KeyLimits, LimitsConfig, RouterConfig
from router.errors import error_response
from router.metrics import RouterMetrics

log = logging.getLogger("router.limits")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request counts against: a configured key's name, its role and its effective limits."""

    name: str
    admin: bool
    limits: KeyLimits


CALLER = web.RequestKey("caller", Caller)


def effective_limits(own: KeyLimits, defaults: KeyLimits) -> KeyLimits:
    """A key's own limits over the defaults. Rate and burst travel as a pair (a key's 100/s must not
    inherit a default burst of 5); a rate without burst gets burst = ceil(rate)."""
    src = own if own.requests_per_s is not None else defaults
    rate, burst = src.requests_per_s, src.burst
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))
    concurrent = own.max_concurrent if own.max_concurrent is not None else defaults.max_concurrent
    return KeyLimits(requests_per_s=rate, burst=burst, max_concurrent=concurrent)


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second up to `burst`; `updated` is the clock reading of the last refill."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def _refill(self, now: float) -> None:
        if now > self.updated:  # a clock that steps back refills nothing rather than draining
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is one (nothing taken)."""
        self._refill(now)
        if self.tokens >= 1.0 - 1e-9:  # float refill may land a hair under a whole token
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def reconfigure(self, rate: float, burst: float, now: float) -> None:
        """New limits keep the tokens earned so far (capped), so a reload neither grants nor takes a burst."""
        self._refill(now)
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


@dataclass(slots=True)
class KeyState:
    in_flight: int = 0
    bucket: TokenBucket | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request was refused; `reason` is the metric label."""

    status: int
    reason: str
    message: str
    retry_after_s: int

    def response(self) -> web.Response:
        code = "overloaded" if self.status == 503 else "rate_limit_exceeded"
        return error_response(self.message, self.status, code=code,
                              headers={"Retry-After": str(self.retry_after_s)})


@dataclass(slots=True)
class Permit:
    """The global slot and the key's concurrency slot of one admitted request; release() is idempotent."""

    limiter: Limiter
    key: KeyState | None
    released: bool = field(default=False)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.limiter.in_flight -= 1
        if self.key is not None:
            self.key.in_flight -= 1


class Limiter:
    """Admission state of one router: the global in-flight count and one `KeyState` per key name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight = 0
        self._keys: dict[str, KeyState] = {}

    def admit(self, caller: Caller | None, cfg: LimitsConfig) -> Permit | Rejection:
        if cfg.max_in_flight is not None and self.in_flight >= cfg.max_in_flight:
            return Rejection(503, "overloaded", f"The router is at capacity ({cfg.max_in_flight} requests in "
                             "flight); retry shortly.", cfg.retry_after_s)
        state = None
        if caller is not None:
            state = self._keys.setdefault(caller.name, KeyState())
            lim = caller.limits
            if lim.max_concurrent is not None and state.in_flight >= lim.max_concurrent:
                return Rejection(429, "concurrency", f"Concurrency limit reached: this API key may have "
                                 f"{lim.max_concurrent} request(s) in flight.", cfg.retry_after_s)
            wait = self._take_token(state, lim)
            if wait > 0:
                return Rejection(429, "rate_limited", f"Rate limit reached: this API key may send "
                                 f"{lim.requests_per_s:g} request(s)/s (burst {lim.burst}).",
                                 max(1, math.ceil(wait)))
            state.in_flight += 1
        self.in_flight += 1
        return Permit(self, state)

    def _take_token(self, state: KeyState, lim: KeyLimits) -> float:
        if lim.requests_per_s is None:
            state.bucket = None
            return 0.0
        rate, now = lim.requests_per_s, self.clock()
        burst = float(lim.burst if lim.burst is not None else max(1, math.ceil(rate)))
        if state.bucket is None:
            state.bucket = TokenBucket.full(rate, burst, now)
        elif (state.bucket.rate, state.bucket.burst) != (rate, burst):
            state.bucket.reconfigure(rate, burst, now)
        return state.bucket.take(now)

    def key_in_flight(self, name: str) -> int:
        state = self._keys.get(name)
        return state.in_flight if state else 0

    def key_counts(self) -> dict[str, int]:
        """Requests in flight per key name (for the admin API and tests)."""
        return {name: state.in_flight for name, state in self._keys.items()}

    def retain(self, names: Collection[str]) -> None:
        """Forget idle state of keys no longer configured (called when the key table is rebuilt)."""
        for name in [n for n, s in self._keys.items() if n not in names and s.in_flight == 0]:
            del self._keys[name]


LIMITER = web.AppKey("limiter", Limiter)


def route_paths(request: web.Request) -> tuple[str, ...]:
    """The request path and, when a route matched, the route's own path: access checks test both, so a
    path spelled differently from the route it reaches cannot slip past them."""
    resource = request.match_info.route.resource
    return (request.path, resource.canonical) if resource is not None else (request.path,)


def limits_middleware(limiter: Limiter, config: Callable[[], RouterConfig],
                      metrics: RouterMetrics) -> Middleware:
    """Admission for /v1/*; must run after the auth middleware, which sets `request[CALLER]`."""

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not any(p.startswith("/v1/") for p in route_paths(request)):
            return await handler(request)
        caller = request.get(CALLER)
        verdict = limiter.admit(caller, config().limits)
        if isinstance(verdict, Rejection):
            key = caller.name if caller else ""
            metrics.rejected.labels(verdict.reason, key).inc()
            log.debug("refused %s %s: %s (key %s)", request.method, request.path, verdict.reason, key or "-")
            return verdict.response()
        try:
            return await handler(request)
        finally:
            verdict.release()

    return admit
