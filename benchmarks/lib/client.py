"""The streaming client the benchmarks time requests with, warm-up requests, and small scrapes (/health,
/metrics, the engines' counters)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.lib.defaults import MODEL


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


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(dict(s.labels), s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name]


async def fetch_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5.0)) as r:
        return await r.text()


async def engine_counters(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[dict[str, float]]:
    """Per engine: finished requests and prefix-cache token counters (Prometheus /metrics)."""
    out = []
    for url in urls:
        text = await fetch_text(session, url + "/metrics")
        out.append({name: sum(v for _, v in prometheus_samples(text, f"vllm:{name}_total"))
                    for name in ("request_success", "prefix_cache_queries", "prefix_cache_hits")})
    return out


async def warm_up(url: str, count: int, model: str = MODEL) -> list[str]:
    """A few short requests with text no workload uses: connections, pools and load polls get going."""
    errors = []
    async with client_session() as s:
        for i in range(count):
            r = await stream_chat(s, url, {"model": model, "max_tokens": 2, "ignore_eos": True, "messages": [
                {"role": "user", "content": f"warm-up {i} {time.time_ns()}"}]}, timeout_s=30)
            if not r.ok:
                errors.append(f"{r.status}: {r.error}")
    return errors
