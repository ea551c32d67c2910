"""Raw-socket helpers and a small corpus of hostile requests, shared by router and engine server tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any


async def raw_exchange(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or `wait_s` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        out += b"<still open>"
    writer.close()
    return out


def post(body: bytes, *extra: bytes, path: bytes = b"/v1/completions", length: int | None = None) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json", *extra,
            b"Content-Length: %d" % (len(body) if length is None else length)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head, head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return status, err


HOSTILE_BODIES = {
    "deep array": b"[" * 100_000 + b"]" * 100_000,
    "deep inside an object": b'{"model":"sim-model","prompt":' + b"[" * 900 + b"]" * 900 + b"}",
    "lone surrogate in model": b'{"model":"\\udc80","prompt":"x"}',
    "lone surrogate in content": b'{"model":"sim-model","messages":[{"role":"user","content":"a\\ud800b"}]}',
    "invalid utf-8": b'{"model":"sim-model","prompt":"\xff\xfe"}',
    "not an object": b"[1,2,3]",
    "truncated": b'{"model":',
}


PROTOCOL_ERRORS = {
    "bad request line": b"GARBAGE\r\n\r\n",
    "header flood": b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
    "bad chunking": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "header too long": b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
}
