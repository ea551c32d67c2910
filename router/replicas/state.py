"""The router's mutable record of each replica, and the registry that holds them.

`ReplicaState` gathers everything the router knows about one replica: configuration (url, models, weight,
labels), health (`HealthTracker`), its own in-flight counters (kept exact by `Lease`) and the engine's
last load report (`LoadSnapshot`). Policies never see it; they get a frozen `ReplicaView` built by
``view(now, stale_after_s)``, where a stale report reads as missing (``load_age_s=None``), never as an
idle engine: a load signal stuck at zero is how one replica ends up with all the traffic.

All times are ``time.monotonic()`` seconds, the same clock the poller stamps reports with.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from urllib.parse import urlsplit

from config.router import LoadSettings
from router.replica_view import ReplicaView
from router.replicas.health import HEALTHY, HealthConfig, HealthTracker, HealthTransition

log = logging.getLogger(__name__)

# How old an engine load report may be and still count (the router passes its load.stale_after_s); the
# default is the config's, so a view built without a config (tests, simulator) judges the same way.
DEFAULT_STALE_AFTER_S: float = LoadSettings.model_fields["stale_after_s"].default

# /metrics without `vllm:cache_config_info` gives a usage fraction but no geometry; the fraction is then
# stored as kv_blocks_used / KV_USAGE_SCALE with block_size 0, so used/total still reads as usage while
# capacity in tokens stays unknown (ReplicaView.kv_capacity_tokens() returns None when block_size is 0).
KV_USAGE_SCALE = 10_000


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """One load report from an engine (its /load JSON, or scraped from its /metrics).

    prefix_cache_queries / prefix_cache_hits are the engine's cumulative token counters; the cluster
    hit rate is the ratio of their deltas. received_at is the router's monotonic time of receipt.
    """

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    received_at: float
    max_num_seqs: int = 0  # the engine's concurrency limit, when its /load says (0: unknown)

    @property
    def kv_usage(self) -> float | None:
        """KV-cache usage in [0, 1], or None when the engine did not say."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total > 0 else None


def validate_url(url: str) -> str:
    """An absolute http(s) URL without a trailing slash (paths like "/health" are appended to it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"replica url must be http(s)://host[:port], got {url!r}")
    return url.rstrip("/")


_MODEL_FIELDS = frozenset({"models", "discovered_models"})


@dataclass(eq=False)
class ReplicaState:
    """Everything the router knows about one replica. Mutable; owned by the router's event loop.

    models: served models from configuration; discovered_models: what its /v1/models said. A replica
        with neither serves any model (a bare engine the router has not asked yet).
    prompt_tokens_total / cached_tokens_total: sums of the engine-reported usage of completed requests,
        so the router can show each replica's observed prefix-cache hit rate.
    finished_since_report: this router's requests that were in flight when ``load`` was received and have
        finished since (the report, up to a poll old, still counts them as running). Storing a new ``load``
        restarts it; `Lease.release` counts.
    """

    name: str
    url: str
    models: frozenset[str] = frozenset()
    weight: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)
    health: HealthTracker = field(default_factory=HealthTracker)
    discovered_models: frozenset[str] = frozenset()
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    load: LoadSnapshot | None = None
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    finished_since_report: int = 0
    on_models_change: Callable[[], None] | None = field(default=None, repr=False)  # set by the registry

    def __setattr__(self, name: str, value: object) -> None:
        """Tell the registry when the served models change (it keeps their union for metric labels); a new
        load report restarts ``finished_since_report``."""
        if name == "load" and value is not self.__dict__.get("load"):
            object.__setattr__(self, "finished_since_report", 0)
        object.__setattr__(self, name, value)
        if name in _MODEL_FIELDS and (hook := self.__dict__.get("on_models_change")) is not None:
            hook()

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("replica name must be non-empty")
        self.url = validate_url(self.url)
        if not self.weight > 0:
            raise ValueError(f"replica {self.name}: weight must be > 0, got {self.weight}")
        self.models = frozenset(self.models)

    @classmethod
    def create(cls, name: str, url: str, *, models: Iterable[str] = (), weight: float = 1.0,
               labels: dict[str, str] | None = None, health: HealthConfig | None = None) -> ReplicaState:
        """Build from configuration values."""
        return cls(name, url, frozenset(models), weight, dict(labels or {}), HealthTracker(health))

    @property
    def served_models(self) -> frozenset[str]:
        """Configured plus discovered models; empty means unknown (serves anything)."""
        return self.models | self.discovered_models

    def serves(self, model: str | None) -> bool:
        served = self.served_models
        return model is None or not served or model in served

    def view(self, now: float, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> ReplicaView:
        """The frozen snapshot policies read. A report older than ``stale_after_s`` is dropped (its
        dynamic numbers read as 0 with ``load_age_s=None``); real KV geometry is static and kept."""
        load = self.load
        age = None if load is None else max(0.0, now - load.received_at)
        live = load if age is not None and age <= stale_after_s else None
        # Real geometry (block_size > 0) is kept at any age; the KV_USAGE_SCALE stand-in is not.
        geometry = live or (load if load is not None and load.block_size > 0 else None)
        return ReplicaView(
            name=self.name, url=self.url, weight=self.weight,
            in_flight_requests=self.in_flight_requests, in_flight_tokens=self.in_flight_tokens,
            running=live.running if live else 0,
            waiting=live.waiting if live else 0,
            kv_blocks_used=live.kv_blocks_used if live else 0,
            kv_blocks_total=geometry.kv_blocks_total if geometry else 0,
            block_size=geometry.block_size if geometry else 0,
            max_num_seqs=load.max_num_seqs if load is not None else 0,
            load_age_s=age if live else None,
            healthy=self.health.admits(now),
            finished_since_report=self.finished_since_report if live else 0,
        )

    def lease(self, prompt_tokens: int = 0, now: float | None = None) -> Lease:
        """Count one request as in flight until the returned lease is released (see `Lease`)."""
        return Lease(self, prompt_tokens, time.monotonic() if now is None else now)

    def record_usage(self, prompt_tokens: int | None, cached_tokens: int | None) -> None:
        """Add one completed request's engine-reported token usage."""
        self.prompt_tokens_total += max(0, prompt_tokens or 0)
        self.cached_tokens_total += max(0, cached_tokens or 0)

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of prompt tokens the engine served from its prefix cache, over completed requests."""
        return self.cached_tokens_total / self.prompt_tokens_total if self.prompt_tokens_total else None


class Lease:
    """One request's claim on a replica's in-flight counters, taken on creation.

    Use ``with replica.lease(n) as lease:`` around the whole upstream exchange, or call ``release()``
    in a ``finally`` when the stream outlives the handler's block. Release is idempotent and happens on
    every exit path (completion, error, cancellation), so counters cannot drift. ``first_token()`` drops
    the prompt tokens early: ``in_flight_tokens`` counts only prompts still waiting for prefill.

    If the replica was half-open, the lease claims its single trial slot; ``record_success`` /
    ``record_failure`` give the verdict, and a lease released without one gives the slot back.
    """

    __slots__ = ("replica", "prompt_tokens", "trial", "started", "_tokens_held", "_released", "_verdict")

    def __init__(self, replica: ReplicaState, prompt_tokens: int, now: float) -> None:
        self.replica = replica
        self.started = now
        self.prompt_tokens = max(0, prompt_tokens)
        replica.health.refresh(now)
        self.trial = replica.health.state == "half_open" and replica.health.begin_trial(now)
        self._tokens_held = True
        self._released = False
        self._verdict = False
        replica.in_flight_requests += 1
        replica.in_flight_tokens += self.prompt_tokens

    @property
    def released(self) -> bool:
        return self._released

    def first_token(self) -> None:
        """Prefill is done: stop counting this prompt in ``in_flight_tokens``."""
        if self._tokens_held:
            self._tokens_held = False
            self.replica.in_flight_tokens -= self.prompt_tokens

    def record_success(self, now: float | None = None) -> HealthTransition | None:
        self._verdict = True
        return self.replica.health.record_success(time.monotonic() if now is None else now)

    def record_failure(self, kind: str, now: float | None = None) -> HealthTransition | None:
        self._verdict = True
        return self.replica.health.record_failure(time.monotonic() if now is None else now, kind)

    def release(self, now: float | None = None) -> None:
        if self._released:
            return
        self._released = True
        self.first_token()
        replica = self.replica
        replica.in_flight_requests -= 1
        load = replica.load
        if load is not None and self.started < load.received_at:  # the report may count it as running
            replica.finished_since_report += 1
        if self.trial and not self._verdict:
            replica.health.end_trial(time.monotonic() if now is None else now)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


TransitionHook = Callable[[ReplicaState, HealthTransition], None]


class ReplicaRegistry:
    """The set of replicas, by name, in insertion order.

    on_transition: called with (replica, transition) for every health change of a member, whoever
    caused it (the poller's checks or the dispatcher's outcomes), so metrics count each ejection once.
    """

    def __init__(self, replicas: Iterable[ReplicaState] = (), *,
                 on_transition: TransitionHook | None = None) -> None:
        self._replicas: dict[str, ReplicaState] = {}
        self._served: frozenset[str] | None = None  # union of served models; None = recompute
        # per model (None: any), the members serving it in insertion order: `eligible` then checks only
        # health; dropped whenever membership or a member's models change
        self._serving: dict[str | None, list[ReplicaState]] = {}
        self._on_transition: TransitionHook | None = None
        self.on_transition = on_transition
        for replica in replicas:
            self.add(replica)

    @property
    def on_transition(self) -> TransitionHook | None:
        return self._on_transition

    @on_transition.setter
    def on_transition(self, hook: TransitionHook | None) -> None:
        """Checked here because a hook with the wrong arity would only fail, swallowed, at the first
        ejection: metrics would silently never count one."""
        if hook is not None:
            try:
                inspect.signature(hook).bind(None, None)
            except TypeError as exc:
                raise TypeError("on_transition must accept (replica: ReplicaState, transition: "
                                f"HealthTransition): {exc}") from None
            except ValueError:  # builtins without a signature: trust them
                pass
        self._on_transition = hook

    def add(self, replica: ReplicaState) -> ReplicaState:
        if replica.name in self._replicas:
            raise ValueError(f"duplicate replica name {replica.name!r}")
        replica.url = validate_url(replica.url)
        replica.health.on_change = partial(self._dispatch, replica)
        replica.on_models_change = self._models_changed
        self._replicas[replica.name] = replica
        self._models_changed()
        return replica

    def remove(self, name: str) -> ReplicaState:
        """Take a replica out of routing and return it, so the caller can wait for its leases to end.
        Raises KeyError for an unknown name."""
        replica = self._replicas.pop(name)
        replica.health.on_change = None
        replica.on_models_change = None
        self._models_changed()
        return replica

    def get(self, name: str) -> ReplicaState | None:
        return self._replicas.get(name)

    def all(self) -> list[ReplicaState]:
        return list(self._replicas.values())

    def names(self) -> list[str]:
        return list(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def __contains__(self, name: object) -> bool:
        return name in self._replicas

    def __iter__(self) -> Iterator[ReplicaState]:
        return iter(self.all())

    def eligible(self, model: str | None, now: float) -> list[ReplicaState]:
        """Replicas that may take a new request for ``model`` now: admitted by health, serving it.

        Which members serve a model changes only with membership or their models, so that part is kept
        per model (for models some member names, so clients cannot grow it) and each request checks
        only health (a 1,000-replica scan was ~530 us per request, most of it re-deriving `serves`)."""
        serving = self._serving.get(model)
        if serving is None:
            serving = [r for r in self._replicas.values() if r.serves(model)]
            if model is None or self.any_serves(model):
                self._serving[model] = serving
        # Healthy, undecayed and not draining admits whatever ``now`` is (its `refresh` has nothing to
        # do): decided from three attributes; every other member asks `admits` (which applies time).
        return [r for r in serving
                if ((h := r.health).state == HEALTHY and not h.level and not h.draining) or h.admits(now)]

    def views(self, model: str | None, now: float,
              stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[ReplicaView]:
        """`eligible` as the views a policy takes."""
        return [r.view(now, stale_after_s) for r in self.eligible(model, now)]

    def any_serves(self, model: str) -> bool:
        """Whether some member names ``model`` among its served models (any health), in O(1): the
        union is kept, recomputed only after a member's models or the membership changed."""
        served = self._served
        if served is None:
            served = self._served = frozenset().union(*(r.served_models for r in self._replicas.values()))
        return model in served

    def _models_changed(self) -> None:
        self._served = None
        self._serving.clear()

    def models(self, now: float | None = None) -> list[str]:
        """Sorted union of the models of replicas in the fleet right now (not ejected, not draining)."""
        t = time.monotonic() if now is None else now
        found: set[str] = set()
        for r in self._replicas.values():
            if r.health.available(t):
                found |= r.served_models
        return sorted(found)

    def _dispatch(self, replica: ReplicaState, transition: HealthTransition) -> None:
        level = logging.WARNING if transition.new == "ejected" else logging.INFO
        extra = f" for {transition.ejection_s:g}s" if transition.new == "ejected" else ""
        log.log(level, "replica %s: %s -> %s%s (%s)", replica.name, transition.old, transition.new, extra,
                transition.reason)
        if self.on_transition is not None:
            try:
                self.on_transition(replica, transition)
            except Exception:  # a metrics hook must never break routing
                log.exception("on_transition hook failed")
