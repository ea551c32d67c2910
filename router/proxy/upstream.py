"""One call to one replica, with the failures that matter for retry and health classified.

A retry is only safe before the client has seen a byte, so `open_upstream` returns as soon as the
replica's response headers arrive (engine servers send headers with the first token), and everything
that can go wrong before then is an `UpstreamFailure` with a kind the caller can count and act on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from router.proxy.http1 import (
    BadResponse,
    ClientError,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    HeadTimeout,
    Response,
    UpstreamPool,
)

# Headers that must not be forwarded (hop-by-hop, or recomputed by the server).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "host", "date", "server",
    "x-request-id",  # the router sets its own (the client's), never a second copy in another case
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
    caller may retry, e.g. 5xx/429), "protocol" (broken response), "deadline" (a non-streamed request
    ran out of its whole-request time, total_s: the replica is working, just long; never retried and
    not held against the replica).
    """

    def __init__(self, kind: str, message: str, status: int | None = None, body: bytes = b"",
                 content_type: str = "application/json") -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.body = body
        self.content_type = content_type
        self.retry_after: str | None = None  # the replica's Retry-After, passed on if the router gives up

    @property
    def health_failure(self) -> bool:
        """Counts against the replica's health: it is down or broken, not just busy (429) or strict (4xx)."""
        return self.kind in ("connect", "timeout", "protocol") or (self.status is not None and self.status >= 500)

    @property
    def retryable(self) -> bool:
        """Worth trying on another replica: not a request that simply takes longer than it may."""
        return self.kind != "deadline"


async def open_upstream(pool: UpstreamPool, url: str, body: bytes, headers: dict[str, str],
                        timeouts: Timeouts, retry_statuses: frozenset[int], *, stream: bool = True) -> Response:
    """POST and wait for the response head. Retryable statuses raise (after reading the small body).

    A streamed request gets its head with the first token: `first_byte_s` bounds prefill and a miss
    is a "timeout" (a stuck replica); its body may then be silent for at most `idle_s` at a time. A
    non-streamed one gets its head only when the whole generation is done, so only `total_s` bounds it,
    its silence is not idleness, and a miss is a "deadline". A connection not made within `connect_s`
    is a "timeout" either way."""
    limit = timeouts.first_byte_s if stream else timeouts.total_s
    try:
        resp = await pool.post(url, body, headers, connect_s=timeouts.connect_s, head_s=limit)
    except HeadTimeout as exc:
        if not stream:
            raise UpstreamFailure("deadline", f"no complete answer within total_s={limit:g}s") from exc
        raise UpstreamFailure("timeout", f"no response headers within {limit:g}s") from exc
    except ConnectTimeout as exc:
        raise UpstreamFailure("timeout", f"timed out: {exc}") from exc
    except (ConnectFailed, Disconnected) as exc:
        raise UpstreamFailure("connect", f"cannot reach replica: {exc}") from exc
    except BadResponse as exc:
        raise UpstreamFailure("protocol", str(exc)) from exc
    if resp.status in retry_statuses:
        try:
            async with asyncio.timeout(timeouts.idle_s):
                data = await resp.read()
        except (TimeoutError, ClientError):
            data = b""
        finally:
            resp.close()
        failure = UpstreamFailure("status", f"replica answered {resp.status}", resp.status, data,
                                  resp.header("Content-Type", "application/json") or "application/json")
        failure.retry_after = resp.header("Retry-After")
        raise failure
    if stream:
        resp.stream(timeouts.idle_s)
    return resp


def forward_headers(upstream: Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers if k.lower() not in HOP_BY_HOP}
