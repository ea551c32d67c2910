"""One call to one replica, with the failures that matter for retry and health classified.

A retry is only safe before the client has seen a byte, so `open_upstream` returns as soon as the
replica's response headers arrive (engine servers send headers with the first token), and everything
that can go wrong before then is an `UpstreamFailure` with a kind the caller can count and act on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

# Headers that must not be forwarded (hop-by-hop, or recomputed by aiohttp).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "host", "date", "server",
})


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


class UpstreamFailure(Exception):
    """The replica failed before any byte reached the client.

    kind: "connect" (refused/unreachable), "timeout" (no headers in time), "status" (an answer the
    caller may retry, e.g. 5xx/429), "protocol" (broken response).
    """

    def __init__(self, kind: str, message: str, status: int | None = None, body: bytes = b"",
                 content_type: str = "application/json") -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.body = body
        self.content_type = content_type

    @property
    def health_failure(self) -> bool:
        """Counts against the replica's health: it is down or broken, not just busy (429) or strict (4xx)."""
        return self.kind in ("connect", "timeout", "protocol") or (self.status is not None and self.status >= 500)


async def open_upstream(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                        timeouts: Timeouts, retry_statuses: frozenset[int]) -> aiohttp.ClientResponse:
    """POST and wait for the response headers. Retryable statuses raise (after reading the small body)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect_s, sock_read=timeouts.idle_s)
    try:
        async with asyncio.timeout(timeouts.first_byte_s):
            resp = await session.post(url, data=body, headers=headers, timeout=timeout)
    except TimeoutError as exc:
        raise UpstreamFailure("timeout", f"no response headers within {timeouts.first_byte_s:g}s") from exc
    except aiohttp.ServerTimeoutError as exc:
        raise UpstreamFailure("timeout", f"timed out: {exc}") from exc
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
        raise UpstreamFailure("connect", f"cannot reach replica: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailure("protocol", f"bad response: {exc}") from exc
    if resp.status in retry_statuses:
        try:
            async with asyncio.timeout(timeouts.idle_s):
                data = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            data = b""
        finally:
            resp.release()
        raise UpstreamFailure("status", f"replica answered {resp.status}", resp.status, data,
                              resp.headers.get("Content-Type", "application/json"))
    return resp


def forward_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
