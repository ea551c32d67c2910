"""Relay a replica's response to the client: SSE events forwarded as they arrive, usage picked up.

Events are forwarded on SSE event boundaries (`\\n\\n`) the moment they are complete, one write per read,
so a token reaches the client as soon as the engine sends it (TCP_NODELAY both ways: aiohttp's server,
`router.proxy.http1`'s connections). The
usage the engine reports (prompt and cached tokens) is read on the way for the policy's feedback; when
the router asked for usage on the client's behalf, that extra usage-only event is not forwarded.
Fewer writes, fewer packets: the answer's headers go out with its first event (`EventStreamResponse`), and
its last events with the end of the chunked body (`RelayResult.tail`), where the upstream's last read
carried both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from router.proxy.http1 import ClientError, Response

MAX_UNTERMINATED = 1 << 20  # an upstream that never ends an event is forwarded raw past this size


@dataclass
class RelayResult:
    """What the relay saw: feeds the outcome."""

    first_byte_at: float | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None  # upstream failure mid-stream (already reported to the client as an SSE event)
    bytes_out: int = 0  # tail included
    tail: bytes = b""  # the stream's last bytes, not written yet: the caller sends them with ``write_eof(tail)``
    done: bool = False  # the OpenAI end event (``data: [DONE]``) was written: the client has its whole answer


class EventStreamResponse(web.StreamResponse):
    """A streamed answer whose headers go out with its first bytes (one write, one packet) instead of on
    their own when it is prepared: the client has nothing to act on before the first event anyway, and an
    engine server sends its own headers with the first token."""

    _send_headers_immediately = False  # aiohttp's switch (`web.Response` sets it too); a no-op if it goes


def _usage_of(event: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(usage, is_usage_only_event) for one SSE event; cheap for the common event without usage."""
    # Engines asked for usage put `"usage":null` in every chunk: only a usage object is worth parsing.
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return None, False
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            continue
        try:
            obj = json.loads(payload)
        except ValueError:
            return None, False
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            return usage, obj.get("choices") == []
    return None, False


def sse_error_event(message: str, code: int = 502) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def relay_sse(upstream: Response, client: web.StreamResponse, idle_s: float,
                    strip_usage_event: bool, result: RelayResult | None = None) -> RelayResult:
    """Forward the event stream; a stalled or broken upstream ends the stream with an SSE error event.

    The stall bound is the upstream's idle timeout, which `open_upstream` sets to ``idle_s`` for streams
    (one timer per stream, not per read). Each read's complete events go out in one write; events are
    split one by one only when the read carries a usage object (once per stream), so a token costs no
    Python loop over its events. The last bytes are not written: when a read turns out to be the
    upstream's last (the next read, without waiting, says the body is over), they are left in
    ``result.tail`` for the caller's ``write_eof``, which sends them and the end of the body in one write
    after the caller has recorded the outcome. ``result`` (if given) is filled as the relay goes, so a
    caller interrupted mid-relay (the client left) still knows what the client got: OpenAI's SDKs close
    the connection as soon as they read ``data: [DONE]``, which may be before the upstream's body ends."""
    if result is None:
        result = RelayResult()
    buf = last = b""
    read, wait = upstream.read_nowait, upstream.wait
    chunk: bytes | None = None
    while True:
        try:
            if chunk is None:
                chunk = read()
            while chunk is None:
                await wait()
                chunk = read()
        except TimeoutError:  # IdleTimeout: nothing within idle_s
            result.error = f"replica sent nothing for {idle_s:g}s"
        except (ClientError, ConnectionError) as exc:
            result.error = f"replica connection broke mid-stream: {exc.__class__.__name__}"
        if result.error is not None:
            await client.write(buf + sse_error_event(result.error))
            return result
        if not chunk:
            break
        buf = buf + chunk if buf else chunk
        end = buf.rfind(b"\n\n")
        if end < 0:
            out = b""
        else:
            out, buf = buf[: end + 2], buf[end + 2:]
            if b'"usage":{' in out or b'"usage": {' in out:
                out = _take_usage(out, result, strip_usage_event)
        if len(buf) > MAX_UNTERMINATED:
            out += buf
            buf = b""
        try:
            chunk = read()  # without waiting: b"" means `out` is the last, for the caller's write_eof
        except (TimeoutError, ClientError, ConnectionError):
            chunk = None  # raised again by the read at the top, after `out` is written
        if chunk == b"":
            last = out
            break
        if out:
            if result.first_byte_at is None:
                result.first_byte_at = time.monotonic()
            await client.write(out)
            result.bytes_out += len(out)
            if out.endswith(b"[DONE]\n\n"):
                result.done = True
    tail = last + buf if buf else last
    if tail:
        if result.first_byte_at is None:
            result.first_byte_at = time.monotonic()
        result.tail = tail
        result.bytes_out += len(tail)
    return result


def _take_usage(events: bytes, result: RelayResult, strip_usage_event: bool) -> bytes:
    """``events`` (complete ones, at least one with a usage object) with the usage read into ``result``
    and, if asked, the usage-only event taken out. Only the events holding a usage object are looked
    at (usually one, the last but [DONE]); the others pass as the slices around them."""
    kept: list[bytes] = []
    copied = 0  # events[:copied] is in `kept` already (or dropped)
    at = _find_usage(events, 0)
    while at >= 0:
        cut = events.rfind(b"\n\n", 0, at)
        start = cut + 2 if cut >= 0 else 0
        end = events.find(b"\n\n", at)
        end = end + 2 if end >= 0 else len(events)
        usage, usage_only = _usage_of(events[start:end])
        if usage is not None:
            result.usage = usage
            if usage_only and strip_usage_event:
                kept.append(events[copied:start])
                copied = end
        at = _find_usage(events, end)
    if not copied:
        return events
    kept.append(events[copied:])
    return b"".join(kept)


def _find_usage(events: bytes, start: int) -> int:
    """Where the next usage object starts (either spelling), or -1."""
    a, b = events.find(b'"usage":{', start), events.find(b'"usage": {', start)
    return a if b < 0 or 0 <= a < b else b


def usage_from_json(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def cached_tokens(usage: dict[str, Any] | None) -> int | None:
    if not usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) else None
