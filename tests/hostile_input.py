"""Raw-socket helpers and a small corpus of hostile requests, shared by router and engine server tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp


async def raw_exchange(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or `wait_s` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        async with asyncio.timeout(wait_s):
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:  # the server answered (and closed) before taking everything
                pass
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        out += b"<still open>"
    except ConnectionError:
        pass
    writer.close()
    return out


def post(body: bytes, *extra: bytes, path: bytes = b"/v1/completions", length: int | None = None) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json", *extra,
            b"Content-Length: %d" % (len(body) if length is None else length)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def assert_still_serves(base_url: str) -> None:
    """After hostile input, the server (router or engine) still answers /metrics and a completion."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base_url}/metrics") as r:
            assert r.status == 200
        async with s.post(f"{base_url}/v1/completions", json={"model": "sim-model", "prompt": "x"}) as r:
            assert r.status == 200


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


# -- the corpus: >= 500 hostile requests, deterministic ----------------------------------------------

send_raw = raw_exchange

_DEEP_TOOLS = '{"model":"sim-model","messages":[{"role":"user","content":"x"}],"tools":' + "[" * 200 + "]" * 200 + "}"
BAD_BODIES: dict[str, bytes] = {
    **HOSTILE_BODIES,
    "empty": b"",
    "null": b"null",
    "string": b'"hello"',
    "number": b"42",
    "nan": b'{"model":"sim-model","prompt":"x","temperature":NaN}',
    "infinity": b'{"model":"sim-model","prompt":"x","max_tokens":Infinity}',
    "trailing garbage": b'{"model":"sim-model","prompt":"x"} garbage',
    "duplicate keys": b'{"model":"sim-model","model":"other","prompt":"x"}',
    "model number": b'{"model":1,"prompt":"x"}',
    "model null": b'{"model":null,"prompt":"x"}',
    "model empty": b'{"model":"","prompt":"x"}',
    "model huge": b'{"model":"' + b"m" * 100_000 + b'","prompt":"x"}',
    "model object": b'{"model":{"a":1},"prompt":"x"}',
    "no model": b'{"prompt":"x"}',
    "no prompt or messages": b'{"model":"sim-model"}',
    "messages string": b'{"model":"sim-model","messages":"hi"}',
    "messages numbers": b'{"model":"sim-model","messages":[1,2]}',
    "messages empty": b'{"model":"sim-model","messages":[]}',
    "message no role": b'{"model":"sim-model","messages":[{"content":"x"}]}',
    "message bad role": b'{"model":"sim-model","messages":[{"role":"wizard","content":"x"}]}',
    "content number": b'{"model":"sim-model","messages":[{"role":"user","content":5}]}',
    "content parts bad": b'{"model":"sim-model","messages":[{"role":"user","content":[{"type":"nope"}]}]}',
    "prompt number": b'{"model":"sim-model","prompt":5}',
    "prompt list of numbers": b'{"model":"sim-model","prompt":[1,2,3]}',
    "prompt list empty": b'{"model":"sim-model","prompt":[]}',
    "prompt list huge": b'{"model":"sim-model","prompt":[' + b",".join([b'"x"'] * 20_000) + b"]}",
    "max_tokens huge": b'{"model":"sim-model","prompt":"x","max_tokens":1000000000000}',
    "max_tokens negative": b'{"model":"sim-model","prompt":"x","max_tokens":-1}',
    "max_tokens float": b'{"model":"sim-model","prompt":"x","max_tokens":1.5}',
    "max_tokens string": b'{"model":"sim-model","prompt":"x","max_tokens":"10"}',
    "max_tokens bigint": b'{"model":"sim-model","prompt":"x","max_tokens":' + b"9" * 5000 + b"}",
    "n huge": b'{"model":"sim-model","prompt":"x","n":1000000}',
    "n zero": b'{"model":"sim-model","prompt":"x","n":0}',
    "temperature string": b'{"model":"sim-model","prompt":"x","temperature":"hot"}',
    "temperature huge": b'{"model":"sim-model","prompt":"x","temperature":1e308}',
    "top_p negative": b'{"model":"sim-model","prompt":"x","top_p":-3}',
    "stream string": b'{"model":"sim-model","prompt":"x","stream":"yes"}',
    "stream_options bad": b'{"model":"sim-model","prompt":"x","stream":true,"stream_options":5}',
    "stop many": b'{"model":"sim-model","prompt":"x","stop":[' + b",".join([b'"s"'] * 100) + b"]}",
    "stop number": b'{"model":"sim-model","prompt":"x","stop":7}',
    "seed huge": b'{"model":"sim-model","prompt":"x","seed":' + b"9" * 40 + b"}",
    "user object": b'{"model":"sim-model","prompt":"x","user":{"a":1}}',
    "tools deep": _DEEP_TOOLS.encode(),
    "tools string": b'{"model":"sim-model","messages":[{"role":"user","content":"x"}],"tools":"all"}',
    "nul in prompt": b'{"model":"sim-model","prompt":"a\\u0000b"}',
    "surrogate pair ok": b'{"model":"sim-model","prompt":"\\ud83d\\ude00","max_tokens":1}',
    "reversed surrogates": b'{"model":"sim-model","prompt":"\\ude00\\ud83d"}',
    "overlong utf8": b'{"model":"sim-model","prompt":"\xc0\xaf"}',
    "utf16 body": '{"model":"sim-model","prompt":"x"}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"model":"sim-model","prompt":"x","max_tokens":1}',
    "wide object": b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(20_000)) + b"}",
    "long string escapes": b'{"model":"sim-model","prompt":"' + b"\\n" * 50_000 + b'","max_tokens":1}',
}
PATHS = (b"/v1/chat/completions", b"/v1/completions", b"/tokenize")
CONTENT_TYPES = (b"application/json", b"text/plain", b"", b"application/x-www-form-urlencoded")


def _request(method: bytes, path: bytes, body: bytes = b"", headers: tuple[bytes, ...] = (),
             content_type: bytes = b"application/json", length: bytes | None = None) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close", *headers]
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    if length is None:
        length = b"%d" % len(body)
    if length:
        lines.append(b"Content-Length: " + length)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def corpus(min_cases: int = 500) -> list[tuple[str, bytes]]:
    """Named raw requests, every one of which a server must answer below 500 (errors in OpenAI JSON)."""
    import gzip
    import zlib

    cases: list[tuple[str, bytes]] = []
    for path in PATHS:
        for ctype in CONTENT_TYPES:
            for name, body in BAD_BODIES.items():
                cases.append((f"{path.decode()} {ctype.decode() or 'no type'} {name}",
                              _request(b"POST", path, body, content_type=ctype)))
    big = b'{"model":"sim-model","prompt":"' + b"x" * (10 << 20) + b'"}'
    cases.append(("10 MB body", _request(b"POST", b"/v1/completions", big)))
    cases.append(("gzip bomb", _request(b"POST", b"/v1/completions", gzip.compress(b"\0" * (30 << 20)),
                                        (b"Content-Encoding: gzip",))))
    cases.append(("corrupt gzip", _request(b"POST", b"/v1/completions", b"\x1f\x8bnope", (b"Content-Encoding: gzip",))))
    cases.append(("corrupt deflate", _request(b"POST", b"/v1/completions", b"nope", (b"Content-Encoding: deflate",))))
    cases.append(("gzip of garbage json", _request(b"POST", b"/v1/completions", gzip.compress(b"{nope"),
                                                   (b"Content-Encoding: gzip",))))
    cases.append(("deflate deep", _request(b"POST", b"/v1/completions", zlib.compress(b"[" * 100_000),
                                           (b"Content-Encoding: deflate",))))
    cases.append(("unknown encoding", _request(b"POST", b"/v1/completions", b"{}", (b"Content-Encoding: zstd9",))))
    for method in (b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"FOO"):
        for path in (b"/v1/chat/completions", b"/v1/models", b"/nope", b"/", b"/admin/x", b"/v1/../../etc/passwd",
                     b"/%00", b"/%ff%fe", b"/v1/completions?x=" + b"a" * 4000):
            cases.append((f"{method.decode()} {path[:30].decode(errors='replace')}", _request(method, path)))
    for name, data in PROTOCOL_ERRORS.items():
        cases.append((f"protocol {name}", data))
    cases += [
        ("bad content-length", _request(b"POST", b"/v1/completions", b"{}", length=b"abc")),
        ("negative content-length", _request(b"POST", b"/v1/completions", b"{}", length=b"-5")),
        ("two content-lengths", _request(b"POST", b"/v1/completions", b"{}", (b"Content-Length: 3",))),
        ("te and cl", _request(b"POST", b"/v1/completions", b"0\r\n\r\n", (b"Transfer-Encoding: chunked",))),
        ("te unknown", _request(b"POST", b"/v1/completions", b"{}", (b"Transfer-Encoding: gzip, chunked",))),
        ("http/0.9", b"GET /\r\n\r\n"),
        ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("tls hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64),
        ("nul in header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nConnection: close\r\n\r\n"),
        ("header no colon", b"GET /health HTTP/1.1\r\nHost: x\r\nnocolon\r\nConnection: close\r\n\r\n"),
        ("space before colon", b"GET /health HTTP/1.1\r\nHost : x\r\nConnection: close\r\n\r\n"),
        ("obs-fold", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n"),
        ("bare lf", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n"),
        ("huge url", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("bad version", b"GET /health HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("chunk size huge", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            b"Content-Type: application/json\r\n\r\nffffffffffffffffffff\r\n"),
        ("bad auth header", _request(b"POST", b"/v1/completions", b"{}", (b"Authorization: Bearer \xff\xfe",))),
        ("bad request id", _request(b"POST", b"/v1/completions", b"{}", (b"X-Request-Id: \xff" + b"r" * 5000,))),
        ("bad session header", _request(b"POST", b"/v1/completions", b'{"model":"sim-model","prompt":"x",'
                                        b'"max_tokens":1}', (b"x-session-id: \xff\xfe",))),
        ("admin text/plain", _request(b"POST", b"/admin/replicas", b'{"name":"e","url":"http://1.2.3.4"}',
                                      content_type=b"text/plain")),
        ("admin evil origin", _request(b"POST", b"/admin/reload", headers=(b"Origin: http://evil.example",))),
    ]
    i = 0
    while len(cases) < min_cases:  # pad with seeded variations (header floods of growing size)
        i += 1
        cases.append((f"header flood {i}", b"GET /health HTTP/1.1\r\n" +
                      b"".join(b"X-%d: %s\r\n" % (j, b"v" * i) for j in range(100 + i)) + b"\r\n"))
    return cases


def check_answer(answer: bytes) -> str:
    """"" if `answer` is acceptable (below 500; errors in OpenAI JSON), "hung", or what is wrong."""
    if answer.endswith(b"<still open>"):
        return "hung"
    if not answer:
        return "closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return f"not HTTP: {answer[:60]!r}"
    if status >= 500:
        return f"status {status}"
    if status < 400:
        return ""
    if b"chunked" in head.lower():
        return "chunked error body"
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} not in OpenAI format: {body[:80]!r}"
    if not isinstance(err, dict) or not {"message", "type", "param", "code"} <= set(err):
        return f"{status} error object incomplete"
    return ""
