"""`python -m router --workers N`: N router processes sharing one port (SO_REUSEPORT), supervised.

Why processes and not threads: one router process is one event loop on one core; N processes use N
cores and survive one another. The kernel spreads new connections over the N listening sockets. Each
worker is an ordinary ``python -m router ... --reuse-port`` with the same arguments, so it reads the same
config file, polls the replicas' load and follows their KV events itself (its own `KVEventHub`): the
workers share the truth (the engines' load reports and cache events) without sharing memory, and two
workers given the same events and load decide alike (`tests/test_router_workers.py`). Several router pods
behind a Kubernetes Service work the same way.

The parent only supervises: a worker that exits unexpectedly is restarted (backoff 1 s doubling to 30 s,
reset after a minute of good health), but one that fails within seconds of starting three times in a row
(a port taken by a process without SO_REUSEPORT, a config it cannot load) stops them all with exit 1; SIGTERM/SIGINT are forwarded so every worker drains its in-flight
requests (``shutdown_grace_s``), and anything still running after the grace is killed; SIGHUP is
forwarded (each worker reloads its config file).

One router, one view:

- ``/metrics`` answers for all workers, whichever one the scrape lands on: the parent gives them a
  private directory (``PROMETHEUS_MULTIPROC_DIR``, made under the temp dir, so two routers on one host
  never share one; removed when the parent exits), counters and histograms are summed, each gauge
  combined by its own rule, and a dead worker's counts stay counted (`router.worker_metrics`);
- ``POST /admin/reload`` and the admin API's replica changes (add, remove, drain, undrain) on one
  worker reach all live workers: the worker that answered writes the change to the control pipe the
  parent gave every worker, and the parent passes it to the others' stdin (`router.siblings`). A SIGHUP
  to the parent still goes to every worker. A worker restarted later starts from the config file, as a
  restarted single router does (admin changes are not written to the file);
- still per worker: what ``GET /admin/...`` shows (that worker's view: health, in-flight, index).

A worker whose parent died (SIGKILL: no forwarding, no cleanup) sees its stdin close, drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from router.siblings import CONTROL_FD_ENV, sender
from router.worker_metrics import DIR_ENV, WORKER_ENV, mark_dead

log = logging.getLogger("router.workers")

RESTART_BACKOFF_S = (1.0, 30.0)  # first delay, cap
HEALTHY_AFTER_S = 60.0  # a worker that ran this long restarts without backoff
QUICK_EXIT_S = 10.0  # a worker exiting this soon after its start failed to start (bad port, bad config)
MAX_QUICK_EXITS = 3  # in a row: give up on all of them, exit 1 (a crash loop helps nobody)


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The arguments of one worker: the parent's, minus ``--workers N``, plus ``--reuse-port``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    if "--reuse-port" not in out:
        out.append("--reuse-port")
    return out


def counted_argv(argv: Sequence[str], workers: int, router_processes: int) -> list[str]:
    """The parent's arguments, telling each worker how many processes share the traffic: ``workers``,
    unless the config or the command line already counted them (``router_processes`` > 1, e.g. pods x
    workers). The cost policy prices the requests in flight one process cannot see by this count."""
    if router_processes > 1:
        return list(argv)
    return [*argv, "--router-processes", str(workers)]


class Workers:
    """Starts, restarts and stops the worker processes."""

    def __init__(self, n: int, argv: Sequence[str], grace_s: float, metrics_dir: Path, control_fd: int) -> None:
        self.n = n
        self.argv = [sys.executable, "-m", "router", *worker_argv(argv)]
        self.grace_s = grace_s
        self.metrics_dir = metrics_dir
        self.control_fd = control_fd  # write end of the control pipe, inherited by every worker
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = [0] * n
        self.stopping = False
        self.failed = asyncio.Event()  # a worker cannot start: the parent stops everything

    async def start(self, i: int) -> None:
        env = {**os.environ, WORKER_ENV: str(i), DIR_ENV: str(self.metrics_dir),
               CONTROL_FD_ENV: str(self.control_fd)}
        self.procs[i] = await asyncio.create_subprocess_exec(*self.argv, env=env, pass_fds=(self.control_fd,),
                                                             stdin=asyncio.subprocess.PIPE)
        log.info("worker %d started (pid %d)", i, self.procs[i].pid)

    def relay(self, line: bytes) -> None:
        """A worker's message on the control pipe goes to every other live worker's stdin (`router.siblings`)."""
        origin = sender(line)
        if origin is None:
            log.warning("unreadable worker message ignored: %r", line[:100])
            return
        log.info("worker pid %d made an admin change: passing it on to the others", origin)
        for proc in self.procs.values():
            if proc.returncode is None and proc.pid != origin and proc.stdin is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):  # exiting now: its restart reads the file
                    proc.stdin.write(line + b"\n")

    async def watch(self, i: int) -> None:
        backoff = RESTART_BACKOFF_S[0]
        quick = 0
        while not self.stopping:
            started = time.monotonic()
            code = await self.procs[i].wait()
            mark_dead(self.metrics_dir, self.procs[i].pid)  # its live gauges go, its counts stay
            if self.stopping:
                return
            ran = time.monotonic() - started
            quick = quick + 1 if ran < QUICK_EXIT_S and code != 0 else 0
            if quick >= MAX_QUICK_EXITS:
                log.error("worker %d exited with %s within %.0fs of starting, %d times in a row: giving up",
                          i, code, QUICK_EXIT_S, quick)
                self.failed.set()
                return
            if ran > HEALTHY_AFTER_S:
                backoff = RESTART_BACKOFF_S[0]
            self.restarts[i] += 1
            log.warning("worker %d (pid %d) exited with %s; restart %d in %.0fs", i, self.procs[i].pid, code,
                        self.restarts[i], backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
            if not self.stopping:
                await self.start(i)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self) -> int:
        """SIGTERM every worker, wait for their drain (grace + 5 s), then kill what is left."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5.0
        worst = 0
        for i, proc in self.procs.items():
            try:
                code = await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("worker %d did not stop in time: killing it", i)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                code = await proc.wait()
            worst = worst or (code if code not in (0, -signal.SIGTERM) else 0)
        return worst


async def supervise(n: int, argv: Sequence[str], grace_s: float) -> int:
    metrics_dir = Path(tempfile.mkdtemp(prefix="router-metrics-"))  # per router: two never collide
    read_fd, write_fd = os.pipe()
    try:
        return await _supervise(Workers(n, argv, grace_s, metrics_dir, write_fd), read_fd)
    finally:
        asyncio.get_running_loop().remove_reader(read_fd)
        os.close(read_fd)
        os.close(write_fd)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _control_reader(workers: Workers, read_fd: int) -> None:
    """Read the control pipe's lines (each write of one short line is atomic) as they come."""
    buffer = bytearray()

    def readable() -> None:
        try:
            buffer.extend(os.read(read_fd, 4096))
        except BlockingIOError:
            return
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            workers.relay(line)

    os.set_blocking(read_fd, False)
    asyncio.get_running_loop().add_reader(read_fd, readable)


async def _supervise(workers: Workers, read_fd: int) -> int:
    n = workers.n
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _control_reader(workers, read_fd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, workers.signal_all, signal.SIGHUP)
    for i in range(n):
        await workers.start(i)
    watchers = [asyncio.create_task(workers.watch(i), name=f"worker-{i}") for i in range(n)]
    log.info("%d router workers on one port (SO_REUSEPORT); SIGTERM drains them all", n)
    stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(workers.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed.cancel()
    code = await workers.stop()
    if workers.failed.is_set():
        code = code or 1
    for w in watchers:
        w.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    return code


def run_workers(n: int, argv: Sequence[str], grace_s: float) -> int:
    """Blocking entry point for `router.cli.main`."""
    return asyncio.run(supervise(n, argv, grace_s))
