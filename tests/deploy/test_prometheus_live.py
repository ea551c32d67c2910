"""A real Prometheus scrapes a running router and two sim engines under a little traffic; every dashboard
query and every metric selector of every alert rule then returns data, and every rule evaluates cleanly.

So no typo'd metric name or label value survives in deploy/: a name that nothing exports returns no data
here. The traffic is shaped so that every series the dashboards and alerts read exists: one engine fails
every request and the other none (retries, ejections, 5xx attempts), one request lacks its API key
(rejections), and a bad config file is written once (a failed reload). Nothing here depends on a random
draw or on how fast the host is: the waits poll for what they wait for (a hang guard bounds each).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, stop_processes
from tests.deploy.test_manifests import DEPLOY, METRIC_RE, load_generator

pytestmark = pytest.mark.timeout(400)
API_KEY = "sk-deploy-test-0123456789"
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes here



def wait_http(url: str, timeout_s: float = 30.0, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status in ok:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout_s} s")


def request(url: str, body: dict | None = None, key: str | None = API_KEY) -> int:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["one-process", "workers-2"])
def router_workers(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def stack(tmp_path: Path, router_workers: int, short_dir: Callable[[], Path]) -> Iterator[str]:
    """Two sim engines, the router (one process, or ``--workers 2``: the same queries must work on the
    workers' merged /metrics) and Prometheus on ephemeral loopback ports; yields Prometheus' URL."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (bash scripts/install.sh installs Debian's package)")
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *cmd: str) -> None:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2]))

    try:
        engines = {"engine-a": free_port(), "engine-b": free_port()}
        for name, port in engines.items():
            faults = ["--fault-error-rate", "1.0" if name == "engine-b" else "0.0"]
            sockets = short_dir()
            events = ["--kv-events-endpoint", f"ipc://{sockets}/events",  # the KV-events panels' series
                      "--kv-events-replay-endpoint", f"ipc://{sockets}/replay"]
            start(name, sys.executable, "-m", "engine_server", "--backend", "sim", "--model", "sim-model",
                  "--profile", "instant", "--port", str(port), *faults, *events)
        router_port = free_port()
        config = {
            "host": "127.0.0.1", "port": router_port,
            "replicas": [{"name": n, "url": f"http://127.0.0.1:{p}"} for n, p in engines.items()],
            "policy": {"name": "round_robin"},  # both engines get traffic (cost would keep the prefix on one)
            "retry": {"max_attempts": 2},
            "health": {"failures_to_eject": 1, "base_ejection_s": 0.5, "max_ejection_s": 1.0,
                       "check_interval_s": 0.5},
            "auth": {"api_keys": [{"name": "test", "value": API_KEY}]},
            "kv_events": {"enabled": True, "tokenizer": "sim"},  # endpoints from each engine's /load
        }
        config_file = tmp_path / "router.yaml"
        config_file.write_text(yaml.safe_dump(config))
        for port in engines.values():
            wait_http(f"http://127.0.0.1:{port}/health")
        start("router", sys.executable, "-m", "router", "--config", str(config_file), "--workers", str(router_workers))
        wait_http(f"http://127.0.0.1:{router_port}/health")

        prom_port = free_port()
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
            "scrape_configs": [
                {"job_name": "prefix-router", "static_configs": [{"targets": [f"127.0.0.1:{router_port}"]}]},
                {"job_name": "vllm-engines",
                 "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in engines.values()]}]},
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
        start("prometheus", prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
              f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}")
        prom = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom}/-/ready")

        base = f"http://127.0.0.1:{router_port}"
        statuses = []
        for i in range(40):
            body = {"model": "sim-model", "max_tokens": 8, "stream": i % 2 == 0,
                    "messages": [{"role": "system", "content": "You are a helpful assistant. " * 20},
                                 {"role": "user", "content": f"question {i % 5}"}]}
            statuses.append(request(f"{base}/v1/chat/completions", body))
            time.sleep(0.1)
        assert statuses.count(200) >= 10, statuses  # engine-a answers every retry
        assert request(f"{base}/v1/models", key=None) == 401  # a rejection
        config_file.write_text(config_file.read_text().replace("http://127.0.0.1", "ftp://127.0.0.1"))
        wait_until(lambda: 'result="error"' in metrics_text(base), "the router refused the bad config file")
        for i in range(10):  # traffic continues, so rates over the last minute stay defined
            request(f"{base}/v1/completions", {"model": "sim-model", "prompt": f"tail {i}", "max_tokens": 4})
            time.sleep(0.2)
        # rate() needs two samples in its window: wait for several scrapes of every target after the traffic
        scraped = "min(count_over_time(up[1m]))"
        before = int(float((query(prom, scraped) or [{"value": [0, "0"]}])[0]["value"][1]))
        wait_until(lambda: bool(query(prom, f"{scraped} >= {before + 3}")), "three more scrapes of every target")
        yield prom
    finally:
        stop_processes(procs)


def wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    """Poll `condition` until it holds; the timeout is a hang guard, not an expectation of speed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def metrics_text(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        return resp.read().decode()


def query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


SELECTOR_RE = re.compile(METRIC_RE.pattern + r"(?:\{[^}]*\})?")


def test_every_dashboard_query_and_alert_selector_returns_data(stack: str) -> None:
    empty = []
    for board, title, expr in load_generator().all_queries():
        if not query(stack, expr.replace("$__rate_interval", RATE_INTERVAL)):
            empty.append(f"{board} / {title}: {expr}")
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            query(stack, rule["expr"])  # parses and evaluates
            for selector in SELECTOR_RE.findall(rule["expr"]):
                if not query(stack, f"count({selector})"):
                    empty.append(f"alert {rule['alert']}: {selector}")
    assert not empty, "no data for:\n" + "\n".join(empty)

    with urllib.request.urlopen(f"{stack}/api/v1/rules", timeout=10) as resp:
        groups = json.load(resp)["data"]["groups"]
    evaluated = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert len(evaluated) == sum(len(g["rules"]) for g in rules["groups"])
    assert set(evaluated.values()) == {"ok"}, evaluated
