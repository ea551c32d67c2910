"""Background probes that keep every `ReplicaState` current: health, load, served models.

Three kinds of probe, each on its own schedule, all plain asyncio tasks on the router's loop:

- ``GET /health`` every ``health_interval_s`` -> `HealthTracker.record_check`. 200 is good; a 503 whose
  body says "draining" marks the replica draining instead of failing it; anything else (other status,
  connect error, timeout) is a failed check.
- ``GET /load`` every ``load_interval_s`` -> a `LoadSnapshot`. The first 404 switches that replica to
  scraping ``GET /metrics`` (stock ``vllm serve`` has no /load), parsed by `parse_vllm_metrics`.
- ``GET /v1/models`` every ``models_interval_s`` (default 10 x health interval) -> discovered models.

Spread: a large fleet's probes go out in groups spread over the interval (about PROBES_PER_TICK a group,
at most MAX_GROUPS groups; a replica's group follows from its name), each replica still once per
interval; the first tick probes all. A probe costs the router ~0.3 ms of CPU, so 1,000 replicas probed at
once would hold the event loop for ~0.3 s every load interval, and requests arriving meanwhile would
wait for it. A small fleet is probed in one group: every tick wakes the idle router (~0.2 ms), which for
two replicas cost more than their probes.

Isolation: a tick only starts probes; it never waits for them. Each (replica, kind) has at most one
probe outstanding, bounded by ``timeout_s``, so a hanging replica skips its own ticks and never delays
anyone else's. The registry is re-read on every tick, so replicas added or removed while running are
picked up or dropped without a restart. Probe errors are logged (once per failure streak, then at debug)
and never end a loop; `stop` ends everything.

A failed /load or /metrics poll changes nothing: the old snapshot just ages until ``ReplicaState.view``
treats it as missing. Health is judged by /health and by real requests only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from router.proxy.http1 import UpstreamPool
from router.replicas.state import KV_USAGE_SCALE, LoadSnapshot, ReplicaRegistry, ReplicaState, TransitionHook

log = logging.getLogger(__name__)

PROBES_PER_TICK = 50  # a tick's probes, about (module docstring, "Spread")
MAX_GROUPS = 20  # ticks an interval's probes are spread over, at most

Probe = Callable[[ReplicaState], Awaitable[None]]

_RUNNING = frozenset({"vllm:num_requests_running"})
_WAITING = frozenset({"vllm:num_requests_waiting"})
_KV_USAGE = frozenset({"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"})  # V1, V0 names
_CACHE_CONFIG = "vllm:cache_config_info"
_QUERIES = frozenset({"vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"})
_HITS = frozenset({"vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"})


def _int_label(labels: dict[str, str], key: str) -> int | None:
    try:
        value = int(labels.get(key, ""))
    except ValueError:  # vLLM writes "None" before the cache is sized
        return None
    return value if value > 0 else None


def parse_vllm_metrics(text: str, received_at: float) -> LoadSnapshot:
    """A `LoadSnapshot` from vLLM's Prometheus text. Samples are summed over engines (data parallel).

    KV geometry comes from ``vllm:cache_config_info`` (labels ``num_gpu_blocks``, ``block_size``).
    Without it only the usage fraction is known: it is stored as ``kv_blocks_used / KV_USAGE_SCALE``
    with ``block_size`` 0 (capacity unknown). Raises ValueError when the text has no vLLM load gauges,
    so a foreign /metrics reads as "no report" rather than as an idle engine.
    """
    running = waiting = queries = hits = 0.0
    usages: list[float] = []
    blocks_total = 0
    block_size = 0
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name in _RUNNING:
                running += sample.value
                seen = True
            elif name in _WAITING:
                waiting += sample.value
                seen = True
            elif name in _KV_USAGE:
                usages.append(sample.value)
            elif name == _CACHE_CONFIG:
                blocks = _int_label(sample.labels, "num_gpu_blocks")
                size = _int_label(sample.labels, "block_size")
                if blocks and size:
                    blocks_total += blocks
                    block_size = block_size or size
            elif name in _QUERIES:
                queries += sample.value
            elif name in _HITS:
                hits += sample.value
    if not seen:
        raise ValueError("no vllm:num_requests_running / vllm:num_requests_waiting in /metrics")
    usage = min(1.0, max(0.0, sum(usages) / len(usages))) if usages else None
    if usage is None:
        used = total = size = 0
    elif blocks_total:
        used, total, size = round(usage * blocks_total), blocks_total, block_size
    else:
        used, total, size = round(usage * KV_USAGE_SCALE), KV_USAGE_SCALE, 0
    return LoadSnapshot(running=round(running), waiting=round(waiting), kv_blocks_used=used,
                        kv_blocks_total=total, block_size=size, prefix_cache_queries=round(queries),
                        prefix_cache_hits=round(hits), received_at=received_at)


def parse_load_json(data: Any, received_at: float) -> LoadSnapshot:
    """A `LoadSnapshot` from an engine server's /load JSON (missing counters read as 0)."""
    if not isinstance(data, dict) or "num_requests_running" not in data:
        raise ValueError("not a /load report")

    def num(key: str) -> int:
        return int(data.get(key) or 0)

    used, total, size = num("kv_blocks_used"), num("kv_blocks_total"), num("block_size")
    if total <= 0 and data.get("kv_cache_usage") is not None:
        used, total, size = round(float(data["kv_cache_usage"]) * KV_USAGE_SCALE), KV_USAGE_SCALE, 0
    return LoadSnapshot(running=num("num_requests_running"), waiting=num("num_requests_waiting"),
                        kv_blocks_used=used, kv_blocks_total=total, block_size=size,
                        prefix_cache_queries=num("prefix_cache_queries"),
                        prefix_cache_hits=num("prefix_cache_hits"), received_at=received_at,
                        max_num_seqs=num("max_num_seqs"))


@dataclass
class _Track:
    """The poller's private bookkeeping for one replica."""

    use_metrics: bool = False  # /load said 404: scrape /metrics instead
    models_due: float = 0.0
    probes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)  # probe kinds in a failure streak (for quiet logs)
    name_hash: int = 0  # its group of probes: this modulo the interval's number of groups


class ReplicaPoller:
    """Keeps the registry's replicas probed until `stop`.

    pool: the connections the probes use (`router.proxy.http1`, a pool of their own, so probes do not keep
        the request path's idle connections alive); the poller never closes it.
    timeout_s: bound on each probe, connect to last byte.
    on_transition: shorthand for ``registry.on_transition`` (one hook sees every health change, from
        probes and from the dispatcher alike, so nothing is counted twice).
    clock: monotonic seconds; must be the clock the dispatcher passes as ``now``.
    """

    def __init__(self, registry: ReplicaRegistry, pool: UpstreamPool, *,
                 health_interval_s: float = 2.0, load_interval_s: float = 0.5, timeout_s: float = 1.0,
                 models_interval_s: float | None = None, on_transition: TransitionHook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min(health_interval_s, load_interval_s, timeout_s) <= 0:
            raise ValueError("intervals and timeout must be > 0")
        if on_transition is not None:
            if registry.on_transition not in (None, on_transition):
                raise ValueError("registry already has a different on_transition hook")
            registry.on_transition = on_transition
        self.registry = registry
        self.pool = pool
        self.health_interval_s = health_interval_s
        self.load_interval_s = load_interval_s
        self.timeout_s = timeout_s
        self.models_interval_s = models_interval_s if models_interval_s is not None else 10 * health_interval_s
        self.clock = clock
        self._tracks: dict[ReplicaState, _Track] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    @property
    def running(self) -> bool:
        return bool(self._loops)

    async def start(self) -> None:
        """Start the loops; the first probes go out immediately. Idempotent."""
        if self._loops:
            return
        self._stop = asyncio.Event()
        self._loops = [
            asyncio.create_task(self._run(self.health_interval_s, self._health_tick), name="poll-health"),
            asyncio.create_task(self._run(self.load_interval_s, self._load_tick), name="poll-load"),
        ]

    async def stop(self) -> None:
        """Stop the loops and cancel outstanding probes; returns when all of them have ended."""
        self._stop.set()
        tasks = [*self._loops, *self._probes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        self._probes.clear()
        for track in self._tracks.values():
            track.probes.clear()

    async def probe_all(self) -> None:
        """Probe every replica once (health, load, models) and wait: a warm start before serving."""
        await asyncio.gather(*(self._guard(kind, r, probe) for r in self.registry.all()
                               for kind, probe in (("health", self.check_health), ("load", self.poll_load),
                                                   ("models", self.discover_models))))

    # --- one probe each; usable on their own -------------------------------------------------------

    async def check_health(self, replica: ReplicaState) -> None:
        try:
            status, body = await self._get(replica, "/health")
        except Exception:  # unreachable, timed out, broken: all the same to a health check
            replica.health.record_check(False, self.clock())
            raise
        if status == 503 and b"draining" in body.lower():
            replica.health.set_draining(True)
            return
        if status == 200:
            replica.health.set_draining(False)
        replica.health.record_check(status == 200, self.clock())
        if status != 200:
            raise _ProbeFailed(f"/health answered {status}")

    async def poll_load(self, replica: ReplicaState) -> None:
        track = self._track(replica)
        if not track.use_metrics:
            status, body = await self._get(replica, "/load")
            if status == 404:
                log.info("replica %s has no /load; scraping /metrics instead", replica.name)
                track.use_metrics = True
            elif status != 200:
                raise _ProbeFailed(f"/load answered {status}")
            else:
                data = json.loads(body)
                replica.load = parse_load_json(data, self.clock())
                if isinstance(data.get("draining"), bool):
                    replica.health.set_draining(data["draining"])
                return
        status, body = await self._get(replica, "/metrics")
        if status != 200:
            raise _ProbeFailed(f"/metrics answered {status}")
        replica.load = parse_vllm_metrics(body.decode("utf-8", "replace"), self.clock())

    async def discover_models(self, replica: ReplicaState) -> None:
        status, body = await self._get(replica, "/v1/models")
        if status != 200:
            raise _ProbeFailed(f"/v1/models answered {status}")
        data = json.loads(body).get("data")
        if not isinstance(data, list):
            raise ValueError("/v1/models without a data list")
        replica.discovered_models = frozenset(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
        self._track(replica).models_due = self.clock() + self.models_interval_s

    # --- scheduling --------------------------------------------------------------------------------

    def groups(self) -> int:
        """How many groups an interval's probes go out in (module docstring, "Spread")."""
        return min(MAX_GROUPS, max(1, -(-len(self.registry) // PROBES_PER_TICK)))

    async def _run(self, interval_s: float, tick: Callable[[int, int], None]) -> None:
        """Call ``tick(group, groups)`` for each group in turn, ``groups`` per interval (group -1 first:
        every replica). Ended by `stop`, which cancels it."""
        turn = -1
        while not self._stop.is_set():
            groups = self.groups()
            try:
                tick(turn % groups if turn >= 0 else -1, groups)
            except Exception:
                log.exception("replica poller tick failed")
            turn += 1
            await asyncio.sleep(interval_s / groups)

    def _due(self, replicas: list[ReplicaState], group: int, groups: int) -> list[ReplicaState]:
        """Those of ``replicas`` in ``group`` of ``groups`` (group -1, or a single group: all)."""
        if group < 0 or groups == 1:
            return replicas
        return [r for r in replicas if self._track(r).name_hash % groups == group]

    def _health_tick(self, group: int, groups: int) -> None:
        replicas = self.registry.all()
        live = set(replicas)
        for gone in [r for r in self._tracks if r not in live]:
            del self._tracks[gone]  # its last probes end on their own within timeout_s
        now = self.clock()
        for replica in self._due(replicas, group, groups):
            self._spawn("health", replica, self.check_health)
            if now >= self._track(replica).models_due:
                self._spawn("models", replica, self.discover_models)

    def _load_tick(self, group: int, groups: int) -> None:
        for replica in self._due(self.registry.all(), group, groups):
            self._spawn("load", replica, self.poll_load)

    def _spawn(self, kind: str, replica: ReplicaState, probe: Probe) -> None:
        track = self._track(replica)
        pending = track.probes.get(kind)
        if pending is not None and not pending.done():
            return  # still waiting on this replica: skip its tick, delay nobody else
        task = asyncio.create_task(self._guard(kind, replica, probe))
        track.probes[kind] = task
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def _track(self, replica: ReplicaState) -> _Track:
        track = self._tracks.get(replica)
        if track is None:
            track = self._tracks[replica] = _Track(name_hash=zlib.crc32(replica.name.encode()))
        return track

    async def _guard(self, kind: str, replica: ReplicaState, probe: Probe) -> None:
        """Run one probe; log a failure streak once at warning, then at debug; never raise.

        The probe coroutine is created here, not by the caller, so a task cancelled before its first
        step leaves no never-awaited coroutine behind."""
        track = self._track(replica)
        try:
            await probe(replica)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = str(exc) or exc.__class__.__name__
            if kind in track.failing:
                log.debug("%s probe of %s failed: %s", kind, replica.name, why)
            else:
                track.failing.add(kind)
                log.warning("%s probe of %s failing: %s", kind, replica.name, why)
        else:
            if kind in track.failing:
                track.failing.discard(kind)
                log.info("%s probe of %s recovered", kind, replica.name)

    async def _get(self, replica: ReplicaState, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET path``, all of it within timeout_s (redirects are not followed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        resp = await self.pool.get(replica.url + path, connect_s=self.timeout_s, head_s=self.timeout_s)
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                return resp.status, await resp.read()
        finally:
            resp.close()


class _ProbeFailed(Exception):
    """A probe got an answer it cannot use (for the failure log)."""
