"""The router's Prometheus metrics: what it decided, what the replicas answered, how long it took.

One registry per router instance (tests run several in one process). Names start with `router_`.

With ``--workers N`` a scrape answers for all workers (`router.worker_metrics`): counters and
histograms are summed; each gauge says how its workers' values combine (``multiprocess_mode``, ignored
by a single process): in-flight requests and calibration observations add up; a replica counts as
healthy if some worker admits it (it then gets traffic, and the `ReplicaDown` alert means every worker
ejected it); cost constants, slot limit and config generation show the highest worker's value (workers
learn the constants from their own share of the traffic; max is the cautious estimate of a replica's
speed, and a restarted worker counting generations from 1 again does not hide the others').
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from router.worker_metrics import SharedMetrics

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)


class _CachedChildren:
    """`labels(*values)` remembers each child: prometheus_client converts every value to str and takes
    a lock on each call, and the request path makes ~9 of them per request. Any `remove` or `clear`
    forgets the cache, so a removed series is never written to through a stale child."""

    def labels(self, *values: object, **named: object) -> Any:
        if named or not values:
            return super().labels(*values, **named)  # type: ignore[misc]
        cache: dict[tuple[object, ...], Any] = self.__dict__.setdefault("_children", {})
        child = cache.get(values)
        if child is None:
            child = cache[values] = super().labels(*values)  # type: ignore[misc]
        return child

    def remove(self, *values: object) -> None:
        self.__dict__.pop("_children", None)
        super().remove(*values)  # type: ignore[misc]

    def clear(self) -> None:
        self.__dict__.pop("_children", None)
        super().clear()  # type: ignore[misc]


class Counter(_CachedChildren, _Counter):
    pass


class Gauge(_CachedChildren, _Gauge):
    pass


class Histogram(_CachedChildren, _Histogram):
    pass


class _Registry(CollectorRegistry):
    """Remembers the collectors that build their families when scraped (not our Counter/Gauge/
    Histogram): with ``--workers`` they are published to the other workers (`router.worker_metrics`)."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self.scrape_time: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if not isinstance(collector, MetricWrapperBase):
            self.scrape_time.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        if collector in self.scrape_time:
            self.scrape_time.remove(collector)


class _Replica(Protocol):
    """What `RouterMetrics.mirror_replicas` reads of a `ReplicaState`."""

    name: str
    in_flight_requests: int
    health: Any  # HealthTracker: admits(now)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = _Registry()
        self.requests = Counter("router_requests", "Requests answered, by model, replica and status",
                                ["model", "replica", "status"], registry=r)
        self.e2e = Histogram("router_request_duration_seconds", "End-to-end latency as the router sees it",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("router_time_to_first_token_seconds",
                              "Time to the first streamed byte as the router sees it", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("router_retries", "Attempts moved to another replica, by reason", ["reason"],
                               registry=r)
        self.retries_denied = Counter("router_retries_denied", "Retries not made because the fleet-wide "
                                      "retry budget was spent (retry.budget_*)", registry=r)
        self.ejections = Counter("router_replica_ejections", "Replicas ejected by health tracking",
                                 ["replica"], registry=r)
        self.healthy = Gauge("router_replica_healthy", "1 if the replica is admitted for traffic", ["replica"],
                             registry=r, multiprocess_mode="livemax")
        self.in_flight = Gauge("router_replica_in_flight", "Requests in flight per replica", ["replica"],
                               registry=r, multiprocess_mode="livesum")
        self.prompt_tokens = Counter("router_prompt_tokens", "Prompt tokens per replica (engine usage)",
                                     ["replica"], registry=r)
        self.cached_tokens = Counter("router_cached_tokens", "Prompt tokens served from the prefix cache",
                                     ["replica"], registry=r)
        self.decision = Histogram("router_decision_seconds", "Time the policy took to choose", ["policy"],
                                  buckets=DECISION_BUCKETS, registry=r)
        self.decisions = Counter("router_decisions", "Policy decisions by reason", ["policy", "reason"],
                                 registry=r)
        self.client_disconnects = Counter("router_client_disconnects", "Clients that left before the end",
                                          registry=r)
        self.rejected = Counter("router_rejected_requests", "Requests refused before routing (auth, limits, "
                                "overload), by reason and key name", ["reason", "key"], registry=r)
        self.config_reloads = Counter("router_config_reloads", "Config changes attempted (file, SIGHUP, "
                                      "admin) by result: ok, or error (the old config stays)", ["result"],
                                      registry=r)
        self.tls_cert_reloads = Counter("router_tls_cert_reloads", "Changed TLS certificate files loaded "
                                        "(ok) or refused, the running certificate kept (error)", ["result"],
                                        registry=r)
        self.cost_constant = Gauge("router_cost_constant_seconds", "The cost policy's time constants per "
                                   "replica (learned online, or pinned), by constant", ["replica", "constant"],
                                   registry=r, multiprocess_mode="livemax")
        self.calibration_observations = Gauge("router_calibration_observations", "Observations the cost "
                                              "policy's calibration has folded in, per replica", ["replica"],
                                              registry=r, multiprocess_mode="livesum")
        self.slot_limit = Gauge("router_replica_slot_limit", "Concurrency limit the cost policy learned from "
                                "the engine's reports (0: not known)", ["replica"], registry=r,
                                multiprocess_mode="livemax")
        self.config_generation = Gauge("router_config_generation", "Generation of the running config "
                                       "(1 at start, +1 per applied change)", registry=r,
                                       multiprocess_mode="livemax")
        # Mirrors state kept elsewhere (the policy's calibration) into gauges when scraped: once per
        # scrape instead of once per request.
        self.before_render: Callable[[], None] | None = None
        # Set in a worker of `--workers N`: render() then answers for all workers.
        self.shared: SharedMetrics | None = None

    def forget_replica(self, name: str) -> None:
        """Drop every series labelled with replica `name` (it left the fleet: series must not pile up
        with every rollout)."""
        for metric in (self.healthy, self.in_flight, self.prompt_tokens, self.cached_tokens, self.ejections,
                       self.calibration_observations, self.slot_limit):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for labels in [k for k in list(self.requests._metrics) if k[1] == name]:  # (model, replica, status)
            with contextlib.suppress(KeyError):
                self.requests.remove(*labels)
        for labels in [k for k in list(self.cost_constant._metrics) if k[0] == name]:  # (replica, constant)
            with contextlib.suppress(KeyError):
                self.cost_constant.remove(*labels)

    def mirror_replicas(self, replicas: Iterable[_Replica], now: float) -> None:
        """Health and in-flight of each replica into their gauges (at scrape time, not per request)."""
        for r in replicas:
            self.healthy.labels(r.name).set(1 if r.health.admits(now) else 0)
            self.in_flight.labels(r.name).set(r.in_flight_requests)

    def refresh(self) -> None:
        """Mirror the state kept elsewhere into gauges (``before_render``)."""
        hook = self.before_render
        if hook is not None:
            try:
                hook()
            except Exception:  # a scrape shows what it can
                log.exception("metrics before_render hook failed")

    def publish(self) -> None:
        """A worker's scrape-time families, for its siblings' scrapes (no-op in a single process)."""
        if self.shared is not None:
            self.shared.publish(self.registry.scrape_time)

    def render(self) -> bytes:
        self.refresh()
        if self.shared is not None:
            self.publish()
            return self.shared.render()
        return generate_latest(self.registry)
