"""Builds a running router from a `RouterConfig`, in one place.

The app (`router.app`) builds a router at start-up and the reloader (`router.reload`) rebuilds parts of it
on every config change; both take the pieces from here, so a config field means the same thing on the
first start and after a reload. This module knows the config and the router's parts, not HTTP routes.

`Router` is everything one running router holds; `start` opens its upstream pool, dispatcher and
poller, `stop` closes them. The `build_*` functions are pure conversions from config sections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config.router import ConfigError, RouterConfig
from router.dispatch import Dispatcher, DispatchSettings
from router.features.hashing import HashingConfig
from router.gc_tuning import Tuning
from router.metrics import RouterMetrics
from router.policies.base import Policy
from router.policies.registry import POLICY_NAMES, create_policy, policy_parameters
from router.proxy.http1 import UpstreamPool
from router.proxy.upstream import Timeouts
from router.replicas.health import HealthConfig, HealthTracker
from router.replicas.poller import ReplicaPoller
from router.replicas.state import ReplicaRegistry, ReplicaState
from router.tracing import Tracing

if TYPE_CHECKING:
    from router.kv_events.prefix_source import PrefixSource

log = logging.getLogger("router")

GC_CHECK_S = 5.0  # how often a running router looks whether a reload rebuilt it (`router.gc_tuning`)


@dataclass
class Router:
    """One running router: the effective config and what was built from it (dispatcher and poller exist
    between `start` and `stop`)."""

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
    gc: Tuning = field(default_factory=Tuning)  # the collector's settings while started
    gc_watch: asyncio.Task[None] | None = None


ROUTER = web.AppKey("router", Router)


def health_config(cfg: RouterConfig) -> HealthConfig:
    h = cfg.health
    return HealthConfig(failures_to_eject=h.failures_to_eject, checks_to_eject=h.checks_to_eject,
                        base_ejection_s=h.base_ejection_s, max_ejection_s=h.max_ejection_s,
                        successes_to_readmit=h.successes_to_readmit)


def dispatch_settings(cfg: RouterConfig) -> DispatchSettings:
    t = cfg.timeouts
    return DispatchSettings(timeouts=Timeouts(t.connect_s, t.first_byte_s, t.idle_s, t.total_s),
                            max_attempts=cfg.retry.max_attempts,
                            retry_statuses=frozenset(cfg.retry.retry_statuses),
                            budget_ratio=cfg.retry.budget_ratio, budget_min_retries=cfg.retry.budget_min_retries,
                            budget_window_s=cfg.retry.budget_window_s,
                            stale_after_s=cfg.load.stale_after_s, replica_header=cfg.replica_header)


def block_hashing(cfg: RouterConfig) -> HashingConfig:
    return HashingConfig(block_chars=cfg.hashing.block_chars)


def build_replicas(cfg: RouterConfig, names: tuple[str, ...] | None = None) -> dict[str, ReplicaState]:
    """New `ReplicaState`s for the config's replicas (only ``names``, in that order, if given), by name.
    A replica the state refuses is a `ConfigError` naming its index in ``replicas``."""
    health = health_config(cfg)
    index = {rc.name: i for i, rc in enumerate(cfg.replicas)}
    built: dict[str, ReplicaState] = {}
    for name in index if names is None else names:
        i = index[name]
        rc = cfg.replicas[i]
        try:
            built[name] = ReplicaState(name=rc.name, url=rc.url, models=frozenset(rc.models), weight=rc.weight,
                                       labels=dict(rc.labels), health=HealthTracker(health))
        except ValueError as exc:
            raise ConfigError(f"replicas.{i}: {exc}") from None
    return built


def build_registry(cfg: RouterConfig) -> ReplicaRegistry:
    registry = ReplicaRegistry()
    for replica in build_replicas(cfg).values():
        registry.add(replica)
    return registry


def policy_kwargs(cfg: RouterConfig) -> dict[str, Any]:
    """The policy's parameters, plus the fleet's router process count for a policy that prices what one
    process cannot see (``router_processes``), unless its params state their own."""
    kwargs = cfg.policy.policy_kwargs()
    if "router_processes" not in kwargs and "router_processes" in policy_parameters(cfg.policy.name):
        kwargs["router_processes"] = cfg.router_processes
    return kwargs


def build_policy(cfg: RouterConfig) -> Policy:
    """A new policy as ``cfg.policy`` says. The registry is the judge of names and parameters (config
    cannot import it), so a refusal becomes a `ConfigError` naming the field, here, for every caller."""
    try:
        return create_policy(cfg.policy.name, **policy_kwargs(cfg))
    except (TypeError, ValueError) as exc:
        where = "policy.params" if cfg.policy.name in POLICY_NAMES else "policy.name"
        if cfg.policy.calibration is not None and "calibration" in str(exc):
            where = "policy.calibration"
        raise ConfigError(f"{where}: {exc}") from None


def new_router(cfg: RouterConfig, tracing: Tracing | None = None) -> Router:
    """A router for ``cfg``, not started (no upstream pool, dispatcher or poller yet)."""
    return Router(config=cfg, registry=build_registry(cfg), metrics=RouterMetrics(), hashing=block_hashing(cfg),
                  tracing=tracing)


async def start(router: Router) -> None:
    """Open the upstream pool and probe session, build the policy and dispatcher for the current config, start polling."""
    cfg, registry = router.config, router.registry
    # One pool of keep-alive connections for all proxied calls (`router.proxy.http1`: lean per packet).
    pool = UpstreamPool(keepalive_s=30.0)
    policy = build_policy(cfg)
    for r in registry.all():
        policy.on_replica_added(r.name)
    router.dispatcher = Dispatcher(registry, policy, pool, router.metrics, dispatch_settings(cfg),
                                   router.tracing)
    # Probes (GET /health, /load, /v1/models) on the same client, in a small pool of their own.
    router.poller = ReplicaPoller(registry, UpstreamPool(max_idle_per_origin=4, keepalive_s=30.0),
                                  health_interval_s=cfg.health.check_interval_s,
                                  load_interval_s=cfg.load.poll_interval_s, timeout_s=cfg.health.check_timeout_s,
                                  on_transition=lambda r, t: _on_transition(router, r.name, t.new))
    await router.poller.start()
    # Everything built so far lives as long as the router: out of the collector's reach from here on.
    router.gc.enabled = cfg.gc_tuning
    router.gc.apply(router.dispatcher)
    router.gc_watch = asyncio.create_task(_follow_rebuilds(router), name="gc-tuning")


async def _follow_rebuilds(router: Router) -> None:
    """Re-freeze after a reload rebuilt the dispatcher (or changed gc_tuning), so the replaced one and
    its policy are collected and the new ones frozen; checked every GC_CHECK_S, off the request path."""
    while True:
        await asyncio.sleep(GC_CHECK_S)
        router.gc.refresh(router.dispatcher, router.config.gc_tuning)


async def stop(router: Router) -> None:
    """Stop polling, close the probes' and the requests' connection pools, give the collector back."""
    if router.gc_watch is not None:
        router.gc_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await router.gc_watch
        router.gc_watch = None
    router.gc.release()
    if router.poller is not None:
        await router.poller.stop()
        await router.poller.pool.close()
    if router.dispatcher is not None:
        await router.dispatcher.pool.close()


def _on_transition(router: Router, name: str, new_state: str) -> None:
    log.warning("replica %s is now %s", name, new_state)
    if new_state == "ejected":
        router.metrics.ejections.labels(name).inc()
