"""The launcher: plans one replica per GPU group, and really starts, health-checks and stops sim replicas."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.router import parse_config
from engine_server.launcher import build_parser, kv_events_tokenizer, parse_gpus, plan_replicas, router_config


def _plan(argv: list[str], extra: list[str] | None = None):
    args: argparse.Namespace = build_parser().parse_args(argv)
    return plan_replicas(args, extra or [])


def test_gpu_ranges_parse() -> None:
    assert parse_gpus("0-3") == [0, 1, 2, 3]
    assert parse_gpus("0,2,4-5") == [0, 2, 4, 5]
    with pytest.raises(ValueError):
        parse_gpus("0,0")


def test_eight_gpus_in_pairs_make_four_tensor_parallel_replicas() -> None:
    specs = _plan(["--gpus", "0-7", "--gpus-per-replica", "2", "--base-port", "8001", "--model", "m"])
    assert [s.port for s in specs] == [8001, 8002, 8003, 8004]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,1", "2,3", "4,5", "6,7"]
    for s in specs:
        i = s.argv.index("--tensor-parallel-size")
        assert s.argv[i + 1] == "2"


def test_gpus_that_do_not_split_evenly_are_refused() -> None:
    with pytest.raises(ValueError, match="groups of 2"):
        _plan(["--gpus", "0-2", "--gpus-per-replica", "2", "--model", "m"])


def test_arguments_after_double_dash_reach_every_replica() -> None:
    specs = _plan(["--cpu-replicas", "2", "--backend", "sim"], ["--profile", "instant"])
    assert all(s.argv[-2:] == ["--profile", "instant"] for s in specs)


def test_kv_events_base_port_gives_each_replica_its_own_pair_of_ports() -> None:
    specs = _plan(["--cpu-replicas", "2", "--backend", "sim", "--kv-events-base-port", "26100"],
                  ["--profile", "instant"])
    assert [s.argv[s.argv.index("--kv-events-endpoint") + 1] for s in specs] == ["tcp://*:26100", "tcp://*:26102"]
    assert [s.argv[s.argv.index("--kv-events-replay-endpoint") + 1] for s in specs] == [
        "tcp://*:26101", "tcp://*:26103"]
    assert all(s.argv[-2:] == ["--profile", "instant"] for s in specs)


def test_the_router_config_names_each_replicas_kv_event_endpoints() -> None:
    specs = _plan(["--cpu-replicas", "2", "--backend", "sim", "--kv-events-base-port", "26100"])
    cfg = router_config(specs, "10.0.0.7", "sim-model", kv_events_tokenizer("sim", "sim-model",
                                                                             ["--chars-per-token", "3"]))
    assert cfg["kv_events"] == {"enabled": True, "tokenizer": "sim", "sim_chars_per_token": 3, "replicas": {
        "replica-0": {"endpoint": "tcp://10.0.0.7:26100", "replay_endpoint": "tcp://10.0.0.7:26101"},
        "replica-1": {"endpoint": "tcp://10.0.0.7:26102", "replay_endpoint": "tcp://10.0.0.7:26103"}}}
    assert parse_config(cfg).kv_events.replicas["replica-1"].endpoint == "tcp://10.0.0.7:26102"  # the router takes it
    assert kv_events_tokenizer("vllm", "./models/tiny-llama", []) == {"tokenizer": "./models/tiny-llama"}
    assert "kv_events" not in router_config(_plan(["--cpu-replicas", "1", "--backend", "sim"]), "h", None)


def test_kv_events_base_port_and_explicit_endpoints_are_not_mixed() -> None:
    with pytest.raises(ValueError, match="kv-events-base-port"):
        _plan(["--cpu-replicas", "1", "--backend", "sim", "--kv-events-base-port", "26100"],
              ["--kv-events-endpoint", "tcp://*:1"])


@pytest.mark.slow
def test_launch_sim_replicas_until_healthy_and_write_router_config(tmp_path: Path) -> None:
    out = tmp_path / "replicas.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "engine_server", "launch", "--cpu-replicas", "2", "--backend", "sim",
         "--model", "sim-model", "--base-port", "18461", "--write-config", str(out), "--exit-when-ready",
         "--health-timeout-s", "60", "--", "--profile", "instant"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "http://127.0.0.1:18461" in proc.stdout and "http://127.0.0.1:18462" in proc.stdout
    cfg = yaml.safe_load(out.read_text())
    assert [r["url"] for r in cfg["replicas"]] == ["http://127.0.0.1:18461", "http://127.0.0.1:18462"]
    assert cfg["replicas"][0]["models"] == ["sim-model"]


def test_help_explains_backends_and_flags() -> None:
    proc = subprocess.run([sys.executable, "-m", "engine_server", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for word in ("--backend", "--tensor-parallel-size", "--profile", "--time-scale", "/load", "launch"):
        assert word in proc.stdout


@pytest.mark.slow
def test_a_crashed_replica_is_restarted_and_sigterm_stops_everything() -> None:
    import json
    import os
    import signal
    import time
    import urllib.request

    port = 18471
    launcher = subprocess.Popen(
        [sys.executable, "-m", "engine_server", "launch", "--cpu-replicas", "1", "--backend", "sim",
         "--model", "sim-model", "--base-port", str(port), "--health-timeout-s", "60", "--shutdown-grace-s", "5",
         "--", "--profile", "instant"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def load() -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/load", timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def replica_pid() -> int | None:
        out = subprocess.run(["pgrep", "-f", f"engine_server --backend sim .*--port {port}"], capture_output=True,
                             text=True).stdout.split()
        return int(out[0]) if out else None

    try:
        deadline = time.monotonic() + 60
        while load() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        first = replica_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = replica_pid()
            if pid not in (None, first) and load() is not None:
                break
            time.sleep(0.2)
        assert replica_pid() not in (None, first), "replica was not restarted"
    finally:
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, err
    assert "restart 1" in err
    assert replica_pid() is None
