"""scripts/demo.sh (the README's first command) with simulated replicas: it serves, stops on Ctrl-C, and
fails fast with the reason when a replica cannot start."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, free_ports

ROOT = Path(__file__).resolve().parent.parent



def demo(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    if not (ROOT / ".venv/bin/python").exists():
        pytest.skip("scripts/demo.sh runs ./.venv/bin/python: this checkout has no ./.venv")
    base = free_ports(int(env.get("REPLICAS", "2")))
    return subprocess.Popen(
        ["bash", "scripts/demo.sh"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "SKIP_INSTALL": "1", "BACKEND": "sim", "MODEL_DIR": "sim-model", "REPLICAS": "2",
             "ROUTER_PORT": str(free_port()), "BASE_PORT": str(base), "CONFIG_FILE": str(tmp_path / "r.yaml"),
             **env})


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} not printed; output:\n" + "".join(seen[-40:]))


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    proc = demo(tmp_path)
    try:
        read_until(proc, "served from its prefix cache", 120)  # the smoke request went through the router
        read_until(proc, "Ctrl-C to stop", 30)
        children = descendants(proc.pid)
        assert children
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode == 130
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_demo_fails_fast_with_the_reason_when_a_replica_cannot_start(tmp_path: Path) -> None:
    proc = demo(tmp_path, REPLICA_ARGS="--fault-die-after-s 0", HEALTH_TIMEOUT_S="600")
    out, _ = proc.communicate(timeout=120)  # far below the 600 s health timeout
    assert proc.returncode == 1
    assert "gave up" in out and "simulated engine failed to start" in out
    assert "the replicas did not start" in out
