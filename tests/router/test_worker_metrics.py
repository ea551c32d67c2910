"""One /metrics for N workers (`router.worker_metrics`): how each family of the workers combines.

The workers are simulated in one process: each `RouterMetrics` is built while prometheus_client's value
class writes to the shared directory under that worker's pid, as it does in a real worker (where
``PROMETHEUS_MULTIPROC_DIR`` is set before prometheus_client is imported).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from prometheus_client import values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import RouterMetrics
from router.worker_metrics import SharedMetrics, mark_dead, merge_collected

A, B = 101, 102  # worker pids


@pytest.fixture
def workers(tmp_path, monkeypatch) -> Iterator[dict[int, RouterMetrics]]:
    """Two workers' metrics writing to ``tmp_path``; a replica "r" known to both."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    out: dict[int, RouterMetrics] = {}
    classes = []
    for pid in (A, B):
        cls = values.MultiProcessValue(lambda pid=pid: pid)
        classes.append(cls)
        monkeypatch.setattr(values, "ValueClass", cls)
        m = out[pid] = RouterMetrics()
        m.shared = SharedMetrics(tmp_path, pid)
        m.requests.labels("m", "r", "200")  # children are created now, each under its worker's pid
        m.e2e.labels("m")
        m.in_flight.labels("r")
        m.healthy.labels("r")
        m.cost_constant.labels("r", "prefill_s_per_token")
    yield out
    for cls in classes:
        cls.close_all_files()


def scrape(m: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def test_counters_and_histograms_sum_over_workers_whichever_answers(workers):
    workers[A].requests.labels("m", "r", "200").inc(3)
    workers[B].requests.labels("m", "r", "200").inc(4)
    workers[A].e2e.labels("m").observe(0.2)
    workers[B].e2e.labels("m").observe(3.0)
    for answering in workers.values():
        s = scrape(answering)
        assert value(s, "router_requests_total", model="m", replica="r", status="200") == 7
        assert value(s, "router_request_duration_seconds_count", model="m") == 2
        assert value(s, "router_request_duration_seconds_bucket", model="m", le="0.25") == 1
        assert value(s, "router_request_duration_seconds_bucket", model="m", le="5.0") == 2


def test_in_flight_adds_up_health_and_constants_show_the_highest_worker(workers):
    workers[A].in_flight.labels("r").set(2)
    workers[B].in_flight.labels("r").set(5)
    workers[A].healthy.labels("r").set(0)  # ejected by one worker: still gets traffic from the other
    workers[B].healthy.labels("r").set(1)
    workers[A].cost_constant.labels("r", "prefill_s_per_token").set(2e-4)
    workers[B].cost_constant.labels("r", "prefill_s_per_token").set(3e-4)
    s = scrape(workers[A])
    assert value(s, "router_replica_in_flight", replica="r") == 7
    assert value(s, "router_replica_healthy", replica="r") == 1
    assert value(s, "router_cost_constant_seconds", replica="r", constant="prefill_s_per_token") == 3e-4
    assert not any("pid" in dict(labels) for _, labels in s)  # no per-worker series


def test_a_dead_workers_counts_stay_and_its_gauges_go(workers, tmp_path):
    workers[A].requests.labels("m", "r", "200").inc(3)
    workers[B].requests.labels("m", "r", "200").inc(4)
    workers[A].in_flight.labels("r").set(2)
    workers[B].in_flight.labels("r").set(5)
    mark_dead(tmp_path, B)
    s = scrape(workers[A])
    assert value(s, "router_requests_total", model="m", replica="r", status="200") == 7
    assert value(s, "router_replica_in_flight", replica="r") == 2


def test_a_replica_the_answering_worker_forgot_is_not_shown(workers):
    workers[A].requests.labels("m", "gone", "200").inc()
    workers[A].requests.labels("m", "none", "503").inc()
    workers[A].shared.replicas = lambda: {"r"}
    s = scrape(workers[A])
    assert not any(dict(labels).get("replica") == "gone" for _, labels in s)
    assert value(s, "router_requests_total", model="m", replica="none", status="503") == 1


class Events:
    """A scrape-time collector like `router.kv_events.live.KVEventsCollector`."""

    def __init__(self, status: str, gaps: int, blocks: int) -> None:
        self.status, self.gaps, self.blocks = status, gaps, blocks

    def collect(self):
        st = GaugeMetricFamily("router_kv_events_status", "status", labels=["replica", "status"])
        for name in ("unsynced", "synced", "stale", "partial"):
            st.add_metric(["r", name], 1.0 if name == self.status else 0.0)
        blocks = GaugeMetricFamily("router_kv_events_blocks", "blocks", labels=["replica"])
        blocks.add_metric(["r"], float(self.blocks))
        gaps = CounterMetricFamily("router_kv_events_gaps", "gaps", labels=["replica"])
        gaps.add_metric(["r"], float(self.gaps))
        return [st, blocks, gaps]


def test_scrape_time_collectors_are_published_and_merged(workers, tmp_path):
    workers[A].registry.register(Events("synced", gaps=1, blocks=10))  # type: ignore[arg-type]
    workers[B].registry.register(Events("stale", gaps=2, blocks=12))  # type: ignore[arg-type]
    workers[B].publish()
    s = scrape(workers[A])
    assert value(s, "router_kv_events_gaps_total", replica="r") == 3
    assert value(s, "router_kv_events_blocks", replica="r") == 12
    statuses = {st: value(s, "router_kv_events_status", replica="r", status=st)
                for st in ("unsynced", "synced", "stale", "partial")}
    assert statuses == {"unsynced": 0, "synced": 0, "stale": 1, "partial": 0}  # the worst worker's
    mark_dead(tmp_path, B)
    s = scrape(workers[A])
    assert value(s, "router_kv_events_gaps_total", replica="r") == 3  # a dead worker's counts stay
    assert value(s, "router_kv_events_blocks", replica="r") == 10  # its gauges go
    assert value(s, "router_kv_events_status", replica="r", status="synced") == 1


def test_merged_status_stays_one_hot_when_workers_disagree():
    def snap(status: str) -> list[dict]:
        return [{"name": "router_kv_events_status", "type": "gauge", "help": "",
                 "samples": [["router_kv_events_status", {"replica": "r", "status": st}, float(st == status)]
                             for st in ("unsynced", "synced", "stale", "partial")]}]

    for statuses, worst in ((("synced", "partial"), "partial"), (("partial", "unsynced"), "unsynced"),
                            (("synced", "synced"), "synced")):
        (fam,) = merge_collected([snap(s) for s in statuses], [])
        assert {s.labels["status"]: s.value for s in fam.samples} == {
            st: float(st == worst) for st in ("unsynced", "synced", "stale", "partial")}


def test_a_single_router_renders_its_own_registry_as_before():
    m = RouterMetrics()
    m.requests.labels("m", "r", "200").inc()
    replica = SimpleNamespace(name="r", in_flight_requests=2, health=SimpleNamespace(admits=lambda now: True))
    m.mirror_replicas([replica], 0.0)
    text = m.render().decode()
    assert 'router_requests_total{model="m",replica="r",status="200"} 1.0' in text
    assert 'router_requests_created{model="m",replica="r",status="200"}' in text  # in-memory values
    assert 'router_replica_in_flight{replica="r"} 2.0' in text
