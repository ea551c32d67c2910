"""The processes of a reliability scenario (sim engines with faults and a router, each its own process) and
the row a scenario reports."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from benchmarks.lib.client import healthy
from benchmarks.lib.defaults import HOST, MODEL, ROOT
from benchmarks.lib.fleet import free_port


@dataclass
class Row:
    scenario: str
    load: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    hung: int = 0
    recovery_s: float | None = None
    rss_mb: tuple[float, float] = (0.0, 0.0)
    fds: tuple[int, int] = (0, 0)
    passed: bool = False
    notes: list[str] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)  # what tests assert on

    def cells(self) -> list[Any]:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        return [self.scenario, self.load, self.sent, self.ok, self.failed, self.hung, rec,
                f"{self.rss_mb[0]:.0f}->{self.rss_mb[1]:.0f}", f"{self.fds[0]}->{self.fds[1]}",
                "PASS" if self.passed else "FAIL", "; ".join(self.notes)]


HEADERS = ["scenario", "load", "sent", "ok", "failed", "hung", "recovery", "router RSS MB", "router fds",
           "result", "notes"]


class Lab:
    """Sim engine and router processes for one scenario; `async with Lab() as lab` stops them all."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="reliab-")
        self.dir = Path(self._tmp.name)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.engine_args: dict[str, list[str]] = {}
        self.router_url = ""
        self.config_path = self.dir / "router.yaml"

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._tmp.cleanup()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[name] = proc
        return proc

    async def engine(self, name: str, *, profile: str = "llmd-8b", latency_ms: float = 0, error_rate: float = 0,
                     hang_rate: float = 0, drop_rate: float = 0, port: int | None = None) -> str:
        port = port or free_port()
        argv = [sys.executable, "-m", "engine_server", "--backend", "sim", "--model", MODEL, "--host", HOST,
                "--port", str(port), "--profile", profile, "--log-level", "error", "--shutdown-grace-s", "1",
                "--fault-latency-ms", str(latency_ms), "--fault-error-rate", str(error_rate),
                "--fault-hang-rate", str(hang_rate), "--fault-drop-rate", str(drop_rate),
                "--seed", str(len(self.engine_args))]  # own seed: each replica draws its own faults
        self.engine_args[name] = argv
        self._spawn(name, argv)
        url = f"http://{HOST}:{port}"
        await self.wait_healthy(url, name)
        return url

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    async def restart(self, name: str) -> None:
        self._spawn(name, self.engine_args[name])
        port = self.engine_args[name][self.engine_args[name].index("--port") + 1]
        await self.wait_healthy(f"http://{HOST}:{port}", name)

    async def router(self, engine_urls: Sequence[str], **cfg: Any) -> str:
        port = free_port()
        config = {"host": HOST, "port": port, "log_level": "error", "shutdown_grace_s": 1.0,
                  "replicas": [{"name": f"r{i}", "url": u, "models": [MODEL]} for i, u in enumerate(engine_urls)],
                  "health": {"check_interval_s": 0.5}, "load": {"poll_interval_s": 0.25}, **cfg}
        self.config_path.write_text(yaml.safe_dump(config))
        self._spawn("router", [sys.executable, "-m", "router", "--config", str(self.config_path)])
        self.router_url = f"http://{HOST}:{port}"
        await self.wait_healthy(self.router_url, "router")
        return self.router_url

    async def wait_healthy(self, url: str, name: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as s:
            while not await healthy(s, url):
                if self.procs[name].poll() is not None:
                    log = (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited during start-up:\n{log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} at {url} not healthy after {timeout_s:g}s")
                await asyncio.sleep(0.05)

    def router_usage(self) -> tuple[float, int]:
        """(RSS in MB, open fds) of the router process."""
        p = psutil.Process(self.procs["router"].pid)
        return p.memory_info().rss / 1e6, p.num_fds()

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None


def usage_before(lab: Lab, row: Row) -> None:
    rss, fds = lab.router_usage()
    row.rss_mb, row.fds = (rss, rss), (fds, fds)


def usage_after(lab: Lab, row: Row) -> None:
    rss, fds = lab.router_usage()
    row.rss_mb, row.fds = (row.rss_mb[0], rss), (row.fds[0], fds)
