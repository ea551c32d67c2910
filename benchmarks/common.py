"""Shared benchmark helpers: a fleet of sim engines plus a router, a streaming client, statistics, output.

`Fleet` starts N sim engine servers and (optionally) one router, either as subprocesses
(``python -m engine_server --backend sim ...`` and ``python -m router --config ...``: client, router and
engines each get their own event loop and process, which is what latency numbers need) or in-process on
the caller's event loop (fast to start; for smoke tests only, since everything then shares one loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "sim-model"
HOST = "127.0.0.1"
# Starting points for `cost` on the sim profiles, from docs/policies.md (only their ratios matter;
# the router's defaults fit H100s). Every benchmark that runs `cost` tuned to a profile uses these.
PROFILE_COST_PARAMS: dict[str, dict[str, float]] = {
    "h100-llama3-8b": {},
    "llmd-8b": {"prefill_s_per_token": 2.5e-4, "request_overhead_s": 1e-2, "decode_s_per_seq": 1e-4},
    "tiny-cpu": {"prefill_s_per_token": 1.5e-4, "request_overhead_s": 7e-3, "decode_s_per_seq": 1e-3},
}
T = TypeVar("T")


# -- processes and fleets ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over CPUs (Linux /proc/stat)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return math.nan, math.nan
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


class CpuWatch:
    """CPU used between `start()` and `stop()`: by given processes, by this one, and by everything else.

    ``other_share`` (busy CPU not used by the watched processes or this one, as a share of all CPUs) flags
    runs disturbed by other jobs on the machine.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.used: list[float] = []  # per watched pid, then this process
        self.busy_share = math.nan
        self.other_share = math.nan
        self._t0: tuple[tuple[float, float], list[float]] | None = None

    def _sample(self) -> list[float]:
        return [cpu_seconds(p) for p in self.pids] + [time.process_time()]

    def start(self) -> CpuWatch:
        self._t0 = (host_cpu_seconds(), self._sample())
        return self

    def stop(self) -> CpuWatch:
        assert self._t0 is not None, "start() first"
        (busy0, total0), used0 = self._t0
        (busy1, total1), used1 = host_cpu_seconds(), self._sample()
        self.used = [b - a for a, b in zip(used0, used1, strict=True)]
        busy, total = busy1 - busy0, total1 - total0
        if total > 0:
            self.busy_share = busy / total
            self.other_share = max(0.0, busy - sum(self.used)) / total
        return self


@dataclass(frozen=True)
class EngineSpec:
    """How every sim engine of a fleet is configured (flags of ``python -m engine_server --backend sim``)."""

    profile: str = "instant"
    time_scale: float = 1.0
    num_blocks: int | None = None
    max_num_seqs: int | None = None
    seed: int = 0

    def argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "engine_server", "--backend", "sim", "--model", MODEL, "--host", HOST,
                "--port", str(port), "--profile", self.profile, "--time-scale", str(self.time_scale),
                "--seed", str(self.seed), "--log-level", "warning", "--shutdown-grace-s", "1"]
        if self.num_blocks is not None:
            argv += ["--num-blocks", str(self.num_blocks)]
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
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

    def config(self, port: int, engine_urls: Sequence[str], model: str = MODEL) -> dict[str, Any]:
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


async def healthy(session: aiohttp.ClientSession, url: str, timeout_s: float = 1.0) -> bool:
    """True if ``url``/health answers 200 within ``timeout_s``; False on any other answer or failure."""
    try:
        async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def client_session(limit: int = 0, *, fresh_connections: bool = False) -> aiohttp.ClientSession:
    """A load-generator session: no connection limit (0) unless given, no total timeout; connections are
    kept alive (as SDK clients pool them) unless ``fresh_connections`` asks for one per request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0,
                                                                force_close=fresh_connections),
                                 timeout=aiohttp.ClientTimeout(total=None))


# -- the streaming client ------------------------------------------------------------------------


@dataclass
class StreamResult:
    """One streamed request as the client saw it (times in seconds from sending it)."""

    status: int
    e2e_s: float
    ttft_s: float | None = None
    arrivals: list[float] = field(default_factory=list)  # receive time of each content event
    usage: dict[str, Any] | None = None
    text: str = ""
    replica: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any], *,
                      headers: dict[str, str] | None = None, keep_text: bool = False,
                      timeout_s: float = 120.0) -> StreamResult:
    """POST a streamed chat completion to ``url`` + /v1/chat/completions and time its events.

    Events are split on SSE boundaries as bytes arrive; JSON is parsed only for usage events (and for
    content events with ``keep_text``), so the client stays cheap at high concurrency.
    """
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s), session.post(
                url + "/v1/chat/completions", json=body, headers=headers) as resp:
            result = StreamResult(status=resp.status, e2e_s=0.0, replica=resp.headers.get("x-router-replica"))
            if resp.status != 200:
                result.error = (await resp.text())[:300]
            else:
                await _read_events(resp, result, t0, keep_text)
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        result = StreamResult(status=0, e2e_s=0.0, error=f"{exc.__class__.__name__}: {exc}")
    result.e2e_s = time.perf_counter() - t0
    return result


async def _read_events(resp: aiohttp.ClientResponse, result: StreamResult, t0: float, keep_text: bool) -> None:
    buf = b""
    parts: list[str] = []
    async for chunk in resp.content.iter_any():
        now = time.perf_counter() - t0
        buf += chunk
        while (end := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:end], buf[end + 2:]
            _on_event(event, now, result, parts if keep_text else None)
    result.text = "".join(parts)


def _on_event(event: bytes, now: float, result: StreamResult, parts: list[str] | None) -> None:
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return
    if b'"error"' in event[:20]:
        result.error = event[6:300].decode(errors="replace")
        return
    if b'"choices":[]' in event:  # the usage-only event
        result.usage = json.loads(event[6:]).get("usage")
        return
    if result.ttft_s is None:
        result.ttft_s = now
    result.arrivals.append(now)
    if parts is not None:
        choice = json.loads(event[6:])["choices"][0]
        parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")


# -- load loops ------------------------------------------------------------------------------------


async def closed_loop(count: int, concurrency: int, deadline_s: float,
                      request: Callable[[int], Awaitable[T]]) -> list[T]:
    """Run ``request(i)`` for i = 0..count-1 with ``concurrency`` workers pulling from one queue.

    Bounded twice: at most ``count`` requests, and no new request starts after ``deadline_s`` seconds.
    Results come back in completion order.
    """
    next_index = iter(range(count))
    stop_at = time.monotonic() + deadline_s
    results: list[T] = []

    async def worker() -> None:
        for i in next_index:
            if time.monotonic() > stop_at:
                return
            results.append(await request(i))

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return results


# -- statistics ------------------------------------------------------------------------------------


def overhead_chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    """A ~200-token chat (8 system prompts shared round-robin, a distinct question): the request the
    router-overhead measurements repeat."""
    system = f"You are assistant number {i % 8}. " * 30
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"Question {i}: what is {i} times {i}?"}]}


def level_stats(results: Sequence[StreamResult], wall: float, watch: CpuWatch, n_router_pids: int) -> dict[str, Any]:
    """One load level's figures: throughput, TTFT/E2E, and CPU per 1,000 requests of router, engines and
    client (``watch`` watched the router pids, then the engine pids, then this process)."""
    ok = [r for r in results if r.ok]
    per_k = 1000.0 / max(1, len(results))
    errors = [r.error or f"status {r.status}" for r in results if not r.ok]
    return {
        "requests": len(results), "errors": len(errors), "first_error": errors[0][:300] if errors else None,
        "wall_s": round(wall, 2), "req_per_s": round(len(results) / wall, 1) if wall > 0 else math.nan,
        "ttft_ms": summarize([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
        "e2e_ms": summarize([r.e2e_s for r in ok], 1e3),
        "cpu_s_per_1k": {"router": round(sum(watch.used[:n_router_pids]) * per_k, 3),
                         "engines": round(sum(watch.used[n_router_pids:-1]) * per_k, 3),
                         "client": round(watch.used[-1] * per_k, 3)},
        "host_cpu_busy": round(watch.busy_share, 3),
        "other_cpu_share": round(watch.other_share, 3),  # other jobs on the machine: should be ~0
    }


def added(direct: dict[str, Any], routed: dict[str, Any]) -> dict[str, float]:
    """Router minus direct, per percentile: a difference of percentiles, not a percentile of differences
    (NaN where either side had no successful request)."""
    return {f"{m}_{q}": round(routed[f"{m}_ms"].get(q, math.nan) - direct[f"{m}_ms"].get(q, math.nan), 3)
            for m in ("ttft", "e2e") for q in ("p50", "p99")}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation between order statistics; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max of ``values`` times ``scale`` (e.g. 1e3 for ms), rounded."""
    if not values:
        return {"n": 0}
    v = [x * scale for x in values]
    out = {"mean": sum(v) / len(v), "p50": percentile(v, 0.5), "p90": percentile(v, 0.9),
           "p99": percentile(v, 0.99), "max": max(v)}
    return {"n": len(v), **{k: round(x, digits) for k, x in out.items()}}


# -- output ------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including the load average at the start (other processes)."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["mem_gib"] = round(mem_kb / 2**20, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = _git("rev-parse", "--short", "HEAD")
        # uncommitted changes to the code under test, if any (read-only query)
        info["modified"] = _git("status", "--porcelain", "--untracked-files=no", "--", "router", "engine_server",
                                "config").split()[1::2]
    return info


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; floats are shown with up to 3 decimals."""
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "nan" if math.isnan(x) else f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1e6 else f"{x:.3g}"
        return str(x)

    text = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(dict(s.labels), s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


async def fetch_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5.0)) as r:
        return await r.text()


def run_benchmark(amain: Callable[[], Awaitable[dict[str, Any]]], path: Path) -> int:
    """Run a benchmark's coroutine on uvloop, stamp the end load average, write its JSON to ``path``."""
    install_uvloop()
    out = asyncio.run(amain())
    out.setdefault("machine", machine_info())["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    write_json(path, out)
    print(f"\nwrote {path}")
    return 0


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
