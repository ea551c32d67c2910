"""One /metrics for N router workers: whichever worker a scrape lands on answers for all of them.

`python -m router --workers N` (`router.workers`) gives its workers a private directory in
``PROMETHEUS_MULTIPROC_DIR``. prometheus_client then keeps every counter, histogram and gauge value of a
worker in an mmap'ed file of that directory (written on every ``inc``/``observe``/``set``, so a worker
killed at any moment has lost nothing it counted), and a scrape merges all the files
(`MultiProcessCollector`) by each family's rule:

- counters and histograms: summed over workers, dead ones included (the parent marks a dead worker
  with ``mark_process_dead``; its counter files stay, so a restart neither loses nor doubles counts);
- gauges (``multiprocess_mode`` set in `router.metrics`, live workers only): in-flight requests and
  calibration observations are summed; replica health, cost constants, slot limit and config generation
  take the max over workers (see `router.metrics` for why each).

Collectors that build families when scraped (``router_kv_events_*``, `router.kv_events.live`) are not
supported by multiprocess mode: every worker writes what they yield to ``collected_<pid>.json`` every
`PUBLISH_EVERY_S` (and just before it answers a scrape), and the scrape merges those files: counters
summed (a dead worker's file is renamed ``dead_collected_<pid>_<ns>.json`` and keeps counting, at most one
period short), gauges the max over live workers, except one-hot status families (``router_kv_events_status``),
which show each replica's worst status among the workers (a request landing on that worker routes by
its approximate index).

Series of a replica the answering worker no longer knows (removed and drained) are left out, as a single
router's `forget_replica` drops them: the files cannot forget a series.

Nothing here runs in a single router process (no ``--workers``): it renders its own registry as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger("router.metrics")

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "ROUTER_WORKER"
PUBLISH_EVERY_S = 1.0
COLLECTED = "collected_{pid}.json"
DEAD = "dead_collected_"
# One-hot status families: the worst status any live worker reports, first = worst.
WORST_FIRST = {"router_kv_events_status": ("unsynced", "stale", "partial", "synced")}
NO_REPLICA = "none"  # router_requests{replica="none"}: answered without a replica


def worker_dir() -> Path | None:
    """The shared metrics directory when this process is a worker of ``--workers N``, else None."""
    path = os.environ.get(DIR_ENV)
    return Path(path) if path and WORKER_ENV in os.environ else None


def mark_dead(path: Path, pid: int) -> None:
    """Called by the parent when worker ``pid`` exits: its live gauges go, its counts stay."""
    mark_process_dead(pid, str(path))
    with contextlib.suppress(FileNotFoundError):  # unique name: a later worker may get the same pid
        os.replace(path / COLLECTED.format(pid=pid), path / f"{DEAD}{pid}_{time.monotonic_ns()}.json")


def _snapshot(collectors: Iterable[Collector]) -> list[dict[str, Any]]:
    out = []
    for collector in collectors:
        for fam in collector.collect():
            out.append({"name": fam.name, "type": fam.type, "help": fam.documentation,
                        "samples": [[s.name, s.labels, s.value] for s in fam.samples]})
    return out


def _read(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # a worker gone mid-rename: its next file or its dead file counts
        return []
    return data if isinstance(data, list) else []


def merge_collected(live: Iterable[list[dict[str, Any]]], dead: Iterable[list[dict[str, Any]]]) -> list[Metric]:
    """Combine the scrape-time collectors' families of every worker (see the module docstring)."""
    fams: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = defaultdict(
        lambda: defaultdict(list))
    for files, alive in ((live, True), (dead, False)):
        for snapshot in files:
            for fam in snapshot:
                if fam["type"] != "counter" and not alive:
                    continue
                fams.setdefault(fam["name"], Metric(fam["name"], fam["help"], fam["type"]))
                for name, labels, value in fam["samples"]:
                    values[fam["name"]][(name, tuple(sorted(labels.items())))].append(float(value))
    for fam_name, fam in fams.items():
        samples = values[fam_name]
        if fam.type == "counter":
            fam.samples = [Sample(n, dict(lk), sum(v)) for (n, lk), v in samples.items()]
        elif fam_name in WORST_FIRST:
            fam.samples = _worst_status(samples, WORST_FIRST[fam_name])
        else:
            fam.samples = [Sample(n, dict(lk), max(v)) for (n, lk), v in samples.items()]
    return list(fams.values())


def _worst_status(samples: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]],
                  worst_first: tuple[str, ...]) -> list[Sample]:
    """One-hot {status} per replica: the worst status any worker holds (unknown statuses rank worst)."""
    rank = {s: i for i, s in enumerate(worst_first)}
    held: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}  # (sample, labels without status)
    statuses: dict[tuple[str, tuple[tuple[str, str], ...]], set[str]] = defaultdict(set)
    for (name, lk), vals in samples.items():
        labels = dict(lk)
        status = labels.pop("status", "")
        key = (name, tuple(sorted(labels.items())))
        statuses[key].add(status)
        if max(vals) > 0 and rank.get(status, -1) < rank.get(held.get(key, ""), len(worst_first)):
            held[key] = status
    return [Sample(name, {**dict(lk), "status": st}, 1.0 if held.get((name, lk)) == st else 0.0)
            for (name, lk), sts in statuses.items() for st in sorted(sts)]


class _Merged(Collector):
    def __init__(self, families: Callable[[], Iterable[Metric]], keep: Collection[str] | None) -> None:
        self.families, self.keep = families, keep

    def collect(self) -> Iterator[Metric]:
        for fam in self.families():
            if self.keep is not None:
                fam.samples = [s for s in fam.samples
                               if (r := s.labels.get("replica", NO_REPLICA)) == NO_REPLICA or r in self.keep]
            yield fam


class SharedMetrics:
    """A worker's side: publish its scrape-time collectors, render everyone's metrics."""

    def __init__(self, path: Path, pid: int | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        # The replicas whose series a scrape shows (None: all); set by the CLI from the registry.
        self.replicas: Callable[[], Collection[str]] | None = None

    def publish(self, collectors: Iterable[Collector]) -> None:
        """Write this worker's scrape-time families (atomically: a scrape reads a whole file or the last)."""
        target = self.path / COLLECTED.format(pid=self.pid)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(_snapshot(collectors)), encoding="utf-8")
        os.replace(tmp, target)

    def families(self) -> list[Metric]:
        def names(pattern: str) -> list[str]:
            return sorted(glob.glob(str(self.path / pattern)))

        for _ in range(3):  # a worker's file renamed to dead while read could count twice: read again
            dead_names = names(DEAD + "*.json")
            live = [_read(p) for p in names(COLLECTED.format(pid="*"))]
            dead = [_read(p) for p in dead_names]
            if names(DEAD + "*.json") == dead_names:
                break
        mmaped = list(MultiProcessCollector(None, str(self.path)).collect())
        return [*mmaped, *merge_collected(live, dead)]

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        keep = set(self.replicas()) if self.replicas is not None else None
        registry.register(_Merged(self.families, keep))
        return generate_latest(registry)


async def publish_every(publish: Callable[[], None], period_s: float = PUBLISH_EVERY_S) -> None:
    """Keep this worker's scrape-time values fresh for scrapes that land on its siblings."""
    while True:
        try:
            publish()
        except Exception:  # a scrape shows the last good file; try again next period
            log.exception("publishing this worker's metrics failed")
        await asyncio.sleep(period_s)
