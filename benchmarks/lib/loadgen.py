"""The load generator: replay a workload's sessions against one OpenAI endpoint, streaming, and time them.

Two ways to offer load, both bounded in request count and wall time:

- fixed concurrency: ``concurrency`` clients, each takes the next session and runs its turns back to
  back (closed loop; load follows the server's speed);
- Poisson arrivals: sessions start at ``rate`` per second whatever the server does (open loop; the
  load is fixed, latency shows the queueing). Trace workloads keep their own timestamps instead.

`closed_loop` is the same closed loop for benchmarks that send their own requests (no workload).

Turns of one session always run in order, each after the previous one completed. Every request yields
a `RequestRecord` whether it succeeded or not: failures (including 429 and 503) stay in the results so
that shedding can never look like a win.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from benchmarks.lib.client import client_session, stream_chat
from benchmarks.lib.defaults import MODEL
from benchmarks.lib.workloads import Session, Workload

T = TypeVar("T")


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds, ``start_s`` from the start of the run."""

    session: str
    turn: int
    status: int  # HTTP status; 0 for a transport error or timeout
    start_s: float
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive content events
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    replica: str | None = None  # from the router's x-router-replica header, when it sends one
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class RunResult:
    records: list[RequestRecord]
    wall_s: float
    mode: str  # "concurrency", "rate" or "trace"
    load: float  # clients, or sessions per second offered
    stopped_by: str  # "count", "time" or "done"


@dataclass(frozen=True)
class LoadSpec:
    """How to offer the load: ``concurrency`` clients, or ``rate`` sessions/s (Poisson), or the trace."""

    concurrency: int | None = None
    rate: float | None = None
    max_requests: int = 10_000
    max_s: float = 300.0
    request_timeout_s: float = 120.0
    seed: int = 0
    fresh_connections: bool = False  # one TCP connection per request instead of keep-alive
    session_header: str | None = None  # send each session's id in this header (session affinity)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency or rate (rate 0 replays trace timestamps)")

    @property
    def mode(self) -> str:
        if self.concurrency is not None:
            return "concurrency"
        return "trace" if self.rate == 0 else "rate"

    @property
    def load(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.rate or 0.0)

    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c={self.concurrency}"
        return f"{self.rate:g}/s" if self.mode == "rate" else "trace"


class _Budget:
    """Shared bounds: no request starts after the count or the deadline is reached."""

    def __init__(self, max_requests: int, max_s: float) -> None:
        self.left = max_requests
        self.deadline = time.monotonic() + max_s
        self.stopped_by = "done"

    def take(self) -> bool:
        if self.left <= 0:
            self.stopped_by = "count"
            return False
        if time.monotonic() > self.deadline:
            self.stopped_by = "time"
            return False
        self.left -= 1
        return True


async def run_workload(url: str, workload: Workload, spec: LoadSpec, *, model: str = MODEL,
                       progress: bool | None = None, description: str = "") -> RunResult:
    """Send ``workload`` to ``url`` (an OpenAI server root) as ``spec`` says; every request is recorded."""
    budget = _Budget(spec.max_requests, spec.max_s)
    records: list[RequestRecord] = []
    total = min(spec.max_requests, workload.num_requests)
    t0 = time.perf_counter()
    with _progress(progress, description or workload.name, total) as tick:
        async with client_session(fresh_connections=spec.fresh_connections) as session:
            async def run_session(s: Session) -> None:
                for turn, req in enumerate(s.turns):
                    if not budget.take():
                        return
                    rec = await _send(session, url, req.body(model), s.id, turn, t0, spec.request_timeout_s,
                                      {spec.session_header: s.id} if spec.session_header else None)
                    records.append(rec)
                    tick()

            if spec.mode == "concurrency":
                queue = iter(workload.sessions)

                async def client() -> None:
                    for s in queue:
                        if budget.left <= 0 or time.monotonic() > budget.deadline:
                            return
                        await run_session(s)

                await asyncio.gather(*(client() for _ in range(max(1, spec.concurrency or 1))))
            else:
                starts = arrival_times(workload, spec)
                tasks = []
                for at, s in zip(starts, workload.sessions, strict=True):
                    delay = at - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if budget.left <= 0 or time.monotonic() > budget.deadline:
                        budget.stopped_by = "count" if budget.left <= 0 else "time"
                        break
                    tasks.append(asyncio.create_task(run_session(s)))
                await asyncio.gather(*tasks)
    records.sort(key=lambda r: r.start_s)
    return RunResult(records, time.perf_counter() - t0, spec.mode, spec.load, budget.stopped_by)


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


def arrival_times(workload: Workload, spec: LoadSpec) -> list[float]:
    """Session start offsets: Poisson at ``spec.rate`` (seeded), or the trace's own timestamps."""
    if spec.mode == "trace":
        return [s.at_s or 0.0 for s in workload.sessions]
    rng = random.Random(spec.seed)
    t, out = 0.0, []
    for _ in workload.sessions:
        out.append(t)
        t += rng.expovariate(spec.rate or 1.0)
    return out


async def _send(session: aiohttp.ClientSession, url: str, body: dict, session_id: str, turn: int, t0: float,
                timeout_s: float, headers: dict[str, str] | None = None) -> RequestRecord:
    start = time.perf_counter() - t0
    r = await stream_chat(session, url, body, headers=headers, timeout_s=timeout_s)
    usage = r.usage or {}
    gaps = [b - a for a, b in zip(r.arrivals, r.arrivals[1:], strict=False)]
    error = r.error
    if r.status == 200 and error is None and r.ttft_s is None:
        error = "stream ended without content"
    return RequestRecord(
        session=session_id, turn=turn, status=r.status, start_s=start, e2e_s=r.e2e_s, ttft_s=r.ttft_s,
        itl_s=gaps, prompt_tokens=r.prompt_tokens, output_tokens=int(usage.get("completion_tokens") or len(r.arrivals)),
        cached_tokens=r.cached_tokens, replica=r.replica, error=error)


class _progress:
    """A rich progress bar on a terminal (or when asked); a no-op otherwise."""

    def __init__(self, enabled: bool | None, description: str, total: int) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.description, self.total = description, total
        self._bar = None

    def __enter__(self) -> _Tick:
        if not self.enabled:
            return _Tick(None, None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), transient=True)
        self._bar.__enter__()
        return _Tick(self._bar, self._bar.add_task(self.description, total=self.total))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@dataclass
class _Tick:
    bar: object | None
    task: object | None

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)  # type: ignore[attr-defined]
