"""Contender routers as subprocesses (`benchmarks.lib.routers`) and the overhead benchmark's smoke run.

Engines are real subprocesses with the `instant` sim profile; peers are skipped with the reason when their
PyPI package is not installed. Every test checks that no router process outlives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from benchmarks.lib.client import client_session, stream_chat
from benchmarks.lib.defaults import MODEL, ROOT
from benchmarks.lib.fleet import EngineSpec, Fleet
from benchmarks.lib.routers import (
    Contender,
    RouterStartError,
    floor_contender,
    our_contenders,
    peer_available,
    peer_contender,
    peer_contenders,
    peer_version,
    run_router,
)
from router.policies.registry import POLICY_NAMES

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
BODY = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- argv shapes (pure) ------------------------------------------------------------------------------


def test_our_contenders_cover_every_policy_and_write_a_config(tmp_path: Path) -> None:
    assert [c.policy for c in our_contenders()] == list(POLICY_NAMES)
    c = Contender(name="cost", kind="ours", policy="cost", params={"seed": 3})
    argv = c.argv(8123, URLS, tmp_path)
    assert argv[:3] == [sys.executable, "-m", "router"] and argv[3] == "--config"
    cfg = yaml.safe_load(Path(argv[4]).read_text())
    assert (cfg["host"], cfg["port"]) == ("127.0.0.1", 8123)
    assert [r["url"] for r in cfg["replicas"]] == URLS
    assert cfg["policy"] == {"name": "cost", "params": {"seed": 3}}
    with pytest.raises(ValueError, match="unknown policy"):
        our_contenders(["nope"])


@pytest.mark.parametrize("kind, module, level", [("sglang-router", "sglang_router.launch_router", "warn"),
                                                 ("vllm-router", "vllm_router.launch_router", "warning")])
def test_peer_argv_binds_loopback_with_workers_policy_and_a_free_metrics_port(kind: str, module: str,
                                                                              level: str, tmp_path: Path) -> None:
    c = peer_contender(kind, "cache_aware")
    argv = c.argv(8123, URLS, tmp_path, metrics_port=8124)
    assert argv[:3] == [sys.executable, "-m", module]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    i = argv.index("--worker-urls")
    assert argv[i + 1:i + 3] == URLS
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prometheus-port") + 1] == "8124"
    assert argv[argv.index("--log-level") + 1] == level
    assert "defaults cache_threshold=0.3" in c.notes
    other = c.argv(8123, URLS, tmp_path)  # a free port is picked when none is given
    assert other[other.index("--prometheus-port") + 1] not in ("29000", "")
    tuned = peer_contender(kind, "cache_aware", cache_threshold=0.5, disable_retries=True)
    assert tuned.argv(1, URLS, tmp_path)[-3:] == ["--cache-threshold", "0.5", "--disable-retries"]


def test_peer_contenders_are_the_named_seven() -> None:
    names = [c.name for c in peer_contenders()]
    assert names == ["sglang:cache_aware", "sglang:round_robin", "sglang:power_of_two",
                     "vllm-router:cache_aware", "vllm-router:consistent_hash", "vllm-router:power_of_two",
                     "vllm-router:kv_aware"]
    assert "get_load" in next(c for c in peer_contenders() if c.name == "sglang:power_of_two").notes
    assert "/tokenize" in next(c for c in peer_contenders() if c.name == "vllm-router:cache_aware").notes
    assert peer_available("ours") is None
    assert "unknown" in (peer_available("haproxy") or "")
    with pytest.raises(ValueError):
        Contender(name="x", kind="haproxy", policy="rr")


def test_the_floor_relay_runs_as_a_contender_on_loopback_in_front_of_every_engine(tmp_path: Path) -> None:
    c = floor_contender()
    argv = c.argv(8123, URLS, tmp_path)
    assert argv[:3] == [sys.executable, "-m", "benchmarks.lib.floor_relay"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--upstream") + 1:] == URLS
    assert peer_available(c.kind) is None and peer_version(c.kind) == peer_version("ours")


# -- running them --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_run_router_ours_routes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async with Fleet(2, EngineSpec(profile="instant"), log_dir=tmp_path) as fleet:
        before = _children()
        async with run_router(our_contenders(["round_robin"])[0], fleet.engine_urls, tmp_path) as r, \
                client_session() as s:
            assert r.pid in _children() and r.version
            res = await stream_chat(s, r.url, BODY)
            assert res.ok and res.replica in ("r0", "r1") and res.usage
        assert _gone(r.pid)
        assert _children() == before  # only the engines remain
        assert r.log_path.exists()


@pytest.mark.timeout(120)
async def test_the_floor_relay_passes_the_engines_streams_through(tmp_path: Path) -> None:
    async with Fleet(2, EngineSpec(profile="instant"), log_dir=tmp_path) as fleet:
        before = _children()
        async with run_router(floor_contender(), fleet.engine_urls, tmp_path) as r, client_session() as s:
            results = [await stream_chat(s, r.url, BODY) for _ in range(4)]
            assert all(x.ok and x.usage for x in results), [(x.error, x.usage, x.text) for x in results]
            direct = await stream_chat(s, fleet.engine_urls[0], BODY)
            # the same answer, passed through: as many content events, the same usage
            assert {len(x.arrivals) for x in results} == {len(direct.arrivals)} and direct.arrivals
            assert {x.usage["completion_tokens"] for x in results} == {direct.usage["completion_tokens"]}
        assert _gone(r.pid)
        assert _children() == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sglang-router", "vllm-router"])
async def test_run_router_peer_round_robin_streams(kind: str, tmp_path: Path) -> None:
    if (why := peer_available(kind)) is not None:
        pytest.skip(why)
    async with Fleet(2, EngineSpec(profile="instant"), log_dir=tmp_path) as fleet:
        before = _children()
        async with run_router(peer_contender(kind, "round_robin"), fleet.engine_urls, tmp_path) as r, \
                client_session() as s:
            assert r.version and r.argv[r.argv.index("--policy") + 1] == "round_robin"
            results = [await stream_chat(s, r.url, BODY) for _ in range(4)]
            assert all(x.ok for x in results), [x.error for x in results]
            assert all(x.usage and "cached_tokens" in x.usage["prompt_tokens_details"] for x in results)
        assert _gone(r.pid)
        assert _children() == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("contender", [
    Contender(name="bad-ours", kind="ours", policy="no_such_policy"),
    peer_contender("vllm-router", "no_such_policy"),
    peer_contender("sglang-router", "round_robin", no_such_flag=1),
], ids=lambda c: c.name)
async def test_a_router_that_cannot_start_raises_with_argv_and_log_tail(contender: Contender,
                                                                         tmp_path: Path) -> None:
    if (why := peer_available(contender.kind)) is not None:
        pytest.skip(why)
    before = _children()
    with pytest.raises(RouterStartError) as err:
        async with run_router(contender, ["http://127.0.0.1:9"], tmp_path, start_timeout_s=15):
            pytest.fail("must not start")
    msg = str(err.value)
    assert "exited with" in msg and err.value.argv
    assert " ".join(err.value.argv[:3]) in msg  # the exact command line
    assert err.value.log_tail and err.value.log_tail.strip()[-200:] in msg
    assert "no_such" in err.value.log_tail.replace("-", "_")
    assert _children() == before


@pytest.mark.timeout(120)
async def test_a_router_that_never_routes_times_out_and_is_killed(tmp_path: Path) -> None:
    """Our router in front of no live engine answers /health but cannot route: a start-up timeout."""
    before = _children()
    with pytest.raises(RouterStartError, match="did not route within"):
        async with run_router(our_contenders(["round_robin"])[0], ["http://127.0.0.1:9"], tmp_path,
                              start_timeout_s=3):
            pytest.fail("must not start")
    assert _children() == before


# -- the overhead benchmark -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_overhead_smoke_has_a_row_per_contender(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--quick", "--concurrency", "1",
                           "--requests", "12", "--warmup", "2", "--engines", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {c["kind"]: c for c in data["contenders"]}
    assert set(rows) == {"ours", "sglang-router", "vllm-router"}
    assert data["machine"]["cpus"] and "loadavg_1m_at_end" in data["machine"]
    for kind, row in rows.items():
        if row["error"]:  # a peer that is missing or failed is reported, never dropped
            assert kind != "ours" and row["error"] in proc.stdout or "ERROR" in proc.stdout
            continue
        assert row["argv"] and row["version"]
        (level,) = row["levels"]
        assert level["router"]["requests"] == 12 and level["router"]["errors"] == 0
        # A Rust router can serve 12 requests within one CPU clock tick: 0 is a valid reading.
        assert level["router"]["cpu_s_per_1k"]["router"] >= 0
        assert set(level["added_ms"]) == {"ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99"}
    assert "direct" in proc.stdout and "router CPU s/1k" in proc.stdout
