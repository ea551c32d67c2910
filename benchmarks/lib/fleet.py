"""A fleet of sim engines plus (optionally) our router, started and stopped together.

`Fleet` starts N sim engine servers and (optionally) one router, either as subprocesses
(``python -m engine_server --backend sim ...`` and ``python -m router --config ...``: client, router and
engines each get their own event loop and process, which is what latency numbers need) or in-process on
the caller's event loop (fast to start; for smoke tests only, since everything then shares one loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from benchmarks.lib.client import client_session, healthy
from benchmarks.lib.defaults import HOST, MODEL, ROOT

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface, never one this process handed out
    before: the kernel may return the same port to two bind-to-0 calls in a row, and two engines given one
    port leave one URL served by the other engine (a fleet of N that is really N-1, counted twice)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def kv_event_endpoints(engine_url: str) -> tuple[str, str]:
    """(PUB, replay) endpoints of the sim engine serving ``engine_url`` when it publishes KV events.

    ``ipc://`` sockets named after the engine's HTTP port: bound by the engine (a ``tcp://`` endpoint is only
    bound with the ``*`` wildcard, i.e. on every interface; benchmarks stay on loopback), local, and
    derivable from the URL alone, so a peer router's command line can name them too."""
    port = engine_url.rstrip("/").rsplit(":", 1)[1]
    base = f"ipc://{tempfile.gettempdir()}/bench-kv-{port}"
    return f"{base}-pub", f"{base}-replay"


@dataclass(frozen=True)
class EngineSpec:
    """How every sim engine of a fleet is configured (flags of ``python -m engine_server --backend sim``)."""

    profile: str = "instant"
    time_scale: float = 1.0
    num_blocks: int | None = None
    max_num_seqs: int | None = None
    seed: int = 0
    kv_events: bool = False  # publish KV cache events (`kv_event_endpoints`) for routers that follow them

    def argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "engine_server", "--backend", "sim", "--model", MODEL, "--host", HOST,
                "--port", str(port), "--profile", self.profile, "--time-scale", str(self.time_scale),
                "--seed", str(self.seed), "--log-level", "warning", "--shutdown-grace-s", "1"]
        if self.num_blocks is not None:
            argv += ["--num-blocks", str(self.num_blocks)]
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.kv_events:
            pub, replay = kv_event_endpoints(f"http://{HOST}:{port}")
            argv += ["--kv-events-endpoint", pub, "--kv-events-replay-endpoint", replay]
        return argv

    def sim_config(self) -> Any:
        from engine_server.sim.backend import SimConfig

        return SimConfig(model_name=MODEL, profile=self.profile, time_scale=self.time_scale,
                         num_blocks=self.num_blocks, max_num_seqs=self.max_num_seqs, seed=self.seed)


@dataclass(frozen=True)
class RouterSpec:
    """The router's policy and polling settings; everything else is the router's default."""

    policy: str = "cost"
    params: dict[str, Any] = field(default_factory=dict)
    load_poll_s: float = 0.5
    health_interval_s: float = 2.0
    kv_events: bool = False  # follow the engines' KV events (endpoints from their /load; sim tokenizer)

    @property
    def needs_kv_events(self) -> bool:
        """The policy prices the engines' KV events: `precise`, or `cost` with ``index`` other than approximate."""
        return self.kv_events or self.policy == "precise" or (
            self.policy == "cost" and self.params.get("index", "approximate") != "approximate")

    def config(self, port: int, engine_urls: Sequence[str], model: str = MODEL) -> dict[str, Any]:
        cfg = self._config(port, engine_urls, model)
        if self.needs_kv_events:
            cfg["kv_events"] = {"enabled": True, "tokenizer": "sim"}
        return cfg

    def _config(self, port: int, engine_urls: Sequence[str], model: str) -> dict[str, Any]:
        return {
            "host": HOST, "port": port,
            "replicas": [{"name": f"r{i}", "url": u, "models": [model]} for i, u in enumerate(engine_urls)],
            "policy": {"name": self.policy, "params": dict(self.params)},
            "load": {"poll_interval_s": self.load_poll_s},
            "health": {"check_interval_s": self.health_interval_s},
            "log_level": "warning", "shutdown_grace_s": 1.0,
        }


class Fleet:
    """N sim engines and optionally a router; ``async with Fleet(...) as f`` starts and stops them all.

    Subprocess logs go to ``log_dir`` (a temporary directory by default) and are quoted when a process
    dies during start-up.
    """

    def __init__(self, engines: int, engine: EngineSpec, router: RouterSpec | None = None, *,
                 inprocess: bool = False, log_dir: Path | None = None, start_timeout_s: float = 30.0) -> None:
        self.n_engines = engines
        self.engine = engine
        self.router = router
        self.inprocess = inprocess
        self.start_timeout_s = start_timeout_s
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="bench-")
        self.log_dir = log_dir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.engine_urls: list[str] = []
        self.router_url: str | None = None
        self.router_pid: int | None = None
        self.engine_pids: list[int] = []
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._runners: list[web.AppRunner] = []

    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        ports = [free_port() for _ in range(self.n_engines)]
        self.engine_urls = [f"http://{HOST}:{p}" for p in ports]
        for i, port in enumerate(ports):
            if self.inprocess:
                await self._serve_engine(port)
            else:
                self.engine_pids.append(self._spawn(f"engine{i}", self.engine.argv(port)).pid)
        await self._wait_healthy(self.engine_urls)
        if self.router is None:
            return
        port = free_port()
        self.router_url = f"http://{HOST}:{port}"
        cfg = self.router.config(port, self.engine_urls)
        if self.inprocess:
            await self._serve_router(cfg, port)
        else:
            path = self.log_dir / "router.yaml"
            path.write_text(yaml.safe_dump(cfg))
            self.router_pid = self._spawn("router", [sys.executable, "-m", "router", "--config", str(path)]).pid
        await self._wait_healthy([self.router_url])
        await asyncio.sleep(2 * self.router.load_poll_s + 0.1)  # let the router read every engine's /load

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for _, proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for _, proc in self._procs:
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._procs.append((name, proc))
        return proc

    async def _serve_engine(self, port: int) -> None:
        from engine_server.app import create_app
        from engine_server.sim.backend import SimBackend

        await self._serve(create_app(SimBackend(self.engine.sim_config())), port)

    async def _serve_router(self, cfg: dict[str, Any], port: int) -> None:
        from config.router import parse_config
        from router.app import create_app

        await self._serve(create_app(parse_config(cfg)), port)

    async def _serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, HOST, port).start()

    async def _wait_healthy(self, urls: Sequence[str]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        async with aiohttp.ClientSession() as s:
            for url in urls:
                while not await healthy(s, url):
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url} not healthy after {self.start_timeout_s:g}s")
                    await asyncio.sleep(0.05)

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode} during start-up:\n{tail}")


async def inspect_replicas(urls: Sequence[str], model: str | None) -> tuple[str, int | None]:
    """For replicas that already run: check they answer and serve ``model`` (default: the first one's
    first model); returns the model and the KV blocks per replica from /load (ours only; None elsewhere)."""
    async with client_session() as s:
        for url in urls:
            try:
                async with s.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    models = [m["id"] for m in (await r.json())["data"]]
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                raise SystemExit(f"--engine-urls: {url}/v1/models failed: {exc}") from exc
            if model is None:
                model = models[0]
            elif model not in models:
                raise SystemExit(f"--engine-urls: {url} does not serve {model!r} (it serves {models})")
        kv_blocks = None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            async with s.get(urls[0] + "/load", timeout=aiohttp.ClientTimeout(total=5)) as r:
                kv_blocks = int((await r.json())["kv_blocks_total"])
    assert model is not None
    return model, kv_blocks
