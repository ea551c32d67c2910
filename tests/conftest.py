"""Shared fixtures: engine servers (sim backend) on loopback ports, in-process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.lib.fleet import free_port  # noqa: F401  (tests import it from here)
from engine_server.app import create_app
from engine_server.sim.backend import SimBackend, SimConfig
from engine_server.sim.faults import FaultConfig

SimServerFactory = Callable[..., Awaitable[TestServer]]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on, for servers numbered from a
    base port (the launcher's replicas). Taken below the kernel's ephemeral range: `free_port` and every
    outgoing connection draw from that range, so one of them could land on ``base + 1`` in the meantime."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for base in range(ephemeral_low - count, 1024, -count):
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports below {ephemeral_low}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
async def sim_server() -> AsyncIterator[SimServerFactory]:
    """Start sim engine servers on 127.0.0.1 (random ports); all are stopped at teardown.

    Keyword arguments go to SimConfig (e.g. profile="instant", time_scale=0.01); `app_kwargs` to create_app.
    """
    servers: list[TestServer] = []

    async def start(app_kwargs: dict[str, Any] | None = None, **sim: Any) -> TestServer:
        sim.setdefault("model_name", "sim-model")
        sim.setdefault("profile", "instant")
        if isinstance(sim.get("faults"), dict):
            sim["faults"] = FaultConfig(**sim["faults"])
        backend = SimBackend(SimConfig(**sim))
        server = TestServer(create_app(backend, **(app_kwargs or {})), host="127.0.0.1",
                            handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close()


AppServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def servers() -> AsyncIterator[AppServerFactory]:
    """Start aiohttp apps (fake engines, routers) on 127.0.0.1 (random ports); stopped at teardown, last
    started first."""
    started: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        started.append(server)
        return server

    yield start
    for s in reversed(started):
        await s.close()


def stop_processes(procs: list[subprocess.Popen[Any]], grace_s: float = 10.0) -> None:
    """SIGTERM every process, then wait up to ``grace_s`` for each and SIGKILL what is still running."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture
def short_dir() -> Iterator[Callable[[], Path]]:
    """Makes directories with short paths, removed afterwards: an ipc:// socket path has ~100 bytes, and
    pytest's tmp_path can be longer."""
    made: list[str] = []

    def make() -> Path:
        made.append(tempfile.mkdtemp(prefix="kv-"))
        return Path(made[-1])

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
