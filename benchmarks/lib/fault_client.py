"""The reliability scenarios' client: requests that tell ok, failed and hung apart (a hang guard, SSE error
events), back-to-back load loops, and small reads of the router's admin API and metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from benchmarks.lib.client import prometheus_samples
from benchmarks.lib.defaults import MODEL
from benchmarks.lib.lab import Row

HANG_GUARD_S = 30.0  # a client waiting longer than this counts as hung


@dataclass
class Result:
    status: int = 0
    outcome: str = "failed"  # ok | failed | hung
    started: bool = False  # saw at least one data event before the end
    error_event: bool = False


def chat(i: int, max_tokens: int = 32, stream: bool = True) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "system", "content": f"You are assistant {i % 7}. " * 20},
                         {"role": "user", "content": f"question {i}"}]}


async def request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], *,
                  guard_s: float = HANG_GUARD_S) -> Result:
    res = Result()
    try:
        async with asyncio.timeout(guard_s):
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                res.status = r.status
                if not body.get("stream") or r.status != 200:
                    await r.read()
                    res.outcome = "ok" if r.status == 200 else "failed"
                    return res
                done = False
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.strip() == b"data: [DONE]":
                        done = True
                        continue
                    if b'"error"' in line[:20]:
                        res.error_event = True
                    else:
                        res.started = True
                res.outcome = "ok" if done and not res.error_event else "failed"
    except TimeoutError:
        res.outcome = "hung"
    except (aiohttp.ClientError, ConnectionError):
        res.outcome = "failed"
    return res


async def load_loop(url: str, concurrency: int, duration_s: float, make_body: Callable[[int], dict[str, Any]]
                    ) -> list[Result]:
    """`concurrency` clients sending back to back for `duration_s`."""
    results: list[Result] = []
    stop = time.monotonic() + duration_s
    counter = iter(range(10**9))

    async def client(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            results.append(await request(s, url, make_body(next(counter))))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*[client(s) for _ in range(concurrency)])
    return results


def tally(row: Row, results: Sequence[Result]) -> None:
    row.sent += len(results)
    row.ok += sum(r.outcome == "ok" for r in results)
    row.failed += sum(r.outcome == "failed" for r in results)
    row.hung += sum(r.outcome == "hung" for r in results)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return await r.json()


async def metric_sum(router_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(router_url + "/metrics") as r:
        return sum(v for _, v in prometheus_samples(await r.text(), name))


async def admitted(router_url: str) -> dict[str, bool]:
    rows = (await get_json(router_url + "/admin/replicas"))["data"]
    return {row["name"]: row["health"]["admitted"] for row in rows if not row["removed"]}
