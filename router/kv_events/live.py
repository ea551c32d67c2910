"""The live router's KV events: a `KVEventHub` following the registry's replicas, and its metrics.

`LiveKVEvents` runs while the app runs (`setup_kv_events` adds it to the app's cleanup context when
``kv_events.enabled``). Every ``rediscover_s`` (and at start) it reconciles the hub with the registry, so
replicas added or removed by a reload or by discovery are followed or dropped without any hook in those
paths: a replica's source is its ``kv_events.replicas`` entry or, with ``discover``, what its ``/load``
advertises (`EventSource.from_load`); a changed source (new endpoint, block size, restarted engine on
another port) is re-subscribed with a fresh index.

Requests get their exact match through `PrefixSource` (`LiveKVEvents.source`), attached to
`RequestFeatures.kv_match` by the app; metrics are read from the hub at scrape time by a collector, so
nothing is updated on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from config.kv_events import KVEventsConfig
from router.features.tokenize import RequestTokenizer, load_tokenizer
from router.kv_events.prefix_source import PrefixSource
from router.kv_events.subscriber import EventSource, KVEventHub

log = logging.getLogger("router.kv_events")

Replicas = Callable[[], list[tuple[str, str]]]  # (name, base URL) of the replicas to follow
STATUSES = ("unsynced", "synced", "stale", "partial")


class LiveKVEvents:
    """Hub + reconciliation loop + prefix source for one router process (see the module docstring)."""

    def __init__(self, cfg: KVEventsConfig, replicas: Replicas, tokenizer: RequestTokenizer) -> None:
        self.cfg = cfg
        self.replicas = replicas
        self.hub = KVEventHub(replay_timeout_s=cfg.replay_timeout_s, idle_probe_s=cfg.idle_probe_s)
        self.source = PrefixSource(self.hub.index, tokenizer)
        self.sources: dict[str, EventSource] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.hub.__aenter__()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        self._task = asyncio.create_task(self._loop(), name="kv-events-reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self.hub.__aexit__(None, None, None)

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep following what we follow; try again next round
                log.exception("kv events: reconciling replicas failed")
            await asyncio.sleep(self.cfg.rediscover_s)

    async def reconcile(self) -> None:
        """Follow exactly the current replicas that publish, each at its current source."""
        wanted = dict(self.replicas())
        for name in [n for n in self.sources if n not in wanted]:
            await self.hub.remove(name)
            del self.sources[name]
            log.info("kv events: stopped following %s (no longer a replica)", name)
        found = await asyncio.gather(*(self.source_of(n, url) for n, url in wanted.items()))
        for name, src in zip(wanted, found, strict=True):
            if src is None or self.sources.get(name) == src:
                continue  # unreachable now, or unchanged: keep what we follow
            self.hub.add(src)
            log.info("kv events: following %s at %s (block size %d)", name, src.endpoint, src.block_size)
            self.sources[name] = src

    async def source_of(self, name: str, url: str) -> EventSource | None:
        static = self.cfg.replicas.get(name)
        load: dict[str, Any] = {}
        if static is None or static.block_size is None or static.model is None:
            if static is None and not self.cfg.discover:
                return None
            load = await self._load(url)
            if not load:
                return None
        if static is None:
            return EventSource.from_load(name, url, load)
        return EventSource(replica=name, endpoint=static.endpoint, replay_endpoint=static.replay_endpoint,
                           topic=static.topic, block_size=static.block_size or int(load.get("block_size") or 0),
                           model=static.model or str(load.get("model") or ""))

    async def _load(self, url: str) -> dict[str, Any]:
        assert self._session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self._session.get(url + "/load") as r:
                if r.status == 200:
                    data = json.loads(await r.read())
                    return data if isinstance(data, dict) else {}
        return {}


class KVEventsCollector(Collector):
    """Per-replica event-sync metrics, read from the hub when /metrics is scraped."""

    def __init__(self, live: LiveKVEvents) -> None:
        self.live = live

    def collect(self) -> Iterator[Any]:
        snap = self.live.hub.index.snapshot()
        status = GaugeMetricFamily("router_kv_events_status", "1 for the replica's event-sync status "
                                   "(synced: exact; partial: lower bound; stale/unsynced: not used)",
                                   labels=["replica", "status"])
        blocks = GaugeMetricFamily("router_kv_events_blocks", "blocks the replica's index holds", labels=["replica"])
        lag = GaugeMetricFamily("router_kv_events_lag_batches", "batches seen published (highest live "
                                "sequence + 1) but not applied yet", labels=["replica"])
        counters = {k: CounterMetricFamily(f"router_kv_events_{k}", help_, labels=["replica"]) for k, help_ in (
            ("gaps", "live sequence gaps detected"), ("replays", "replay requests issued"),
            ("lost", "batches lost beyond the replay buffer"), ("restarts", "engine publisher restarts seen"),
            ("batches", "event batches applied"))}
        for name, s in snap.items():
            for st in STATUSES:
                status.add_metric([name, st], 1.0 if s["status"] == st else 0.0)
            blocks.add_metric([name], float(s["blocks"]))
            sync = self.live.hub.index.replica(name)
            seen = sync.highest_seen if sync is not None else None
            lag.add_metric([name], float(max(0, seen + 1 - s["next_seq"])) if seen is not None else 0.0)
            for k, fam in counters.items():
                fam.add_metric([name], float(s["sync"][k]))
        yield status
        yield blocks
        yield lag
        yield from counters.values()


async def start_live(cfg: KVEventsConfig, replicas: Replicas, registry: CollectorRegistry) -> LiveKVEvents:
    """Load the tokenizer (off the loop: a HF tokenizer takes a moment), start following, export metrics."""
    tokenizer = await asyncio.to_thread(load_tokenizer, cfg.tokenizer or "sim",
                                        chars_per_token=cfg.sim_chars_per_token)
    live = LiveKVEvents(cfg, replicas, tokenizer)
    await live.start()
    registry.register(KVEventsCollector(live))
    return live


@contextlib.asynccontextmanager
async def running(cfg: KVEventsConfig, replicas: Replicas, registry: CollectorRegistry) -> AsyncIterator[LiveKVEvents]:
    live = await start_live(cfg, replicas, registry)
    try:
        yield live
    finally:
        await live.stop()
