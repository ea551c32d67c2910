"""Hostile-input guards for request bodies and protocol errors, the same in both servers.

Both servers face clients they do not control, so everything a client can send must end in a 4xx in
OpenAI's error format (`{"error": {"message", "type", "param", "code"}}`), never a 500 or a traceback:

- `read_json_object(request, timeout_s)` reads the body within a deadline (408), refuses bodies over the
  app's `client_max_size` (413, also after gzip/deflate decompression, so a gzip bomb stops at the limit),
  corrupt compressed bodies (400), invalid JSON or UTF-8 (400), nesting deeper than `MAX_JSON_DEPTH`
  (400, instead of a RecursionError now or in a later `json.dumps`), lone UTF-16 surrogates written as
  `\\udc80` escapes (400, instead of a UnicodeEncodeError wherever the text is encoded), and anything
  but a JSON object (400).
- `install_json_protocol_errors(runner)` makes aiohttp's own protocol-level answers (malformed request
  line, too many or too long headers, bad chunked encoding: the request never reaches a handler) JSON
  in the same format instead of aiohttp's plain text.
"""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web, web_protocol, web_server

from openai_http.errors import error_response

MAX_JSON_DEPTH = 64  # OpenAI bodies nest about 6 deep (tools' JSON schemas a little more)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class BodyError(Exception):
    """A body refused with `status`; `response()` is the OpenAI-format answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        return error_response(self.message, self.status)

    async def respond_and_close(self, request: web.Request,
                                headers: dict[str, str] | None = None) -> web.StreamResponse:
        """Send the answer, then close the connection at once: aiohttp would otherwise linger reading
        the rest of a body that is broken (logging its error with a traceback) or that trickles in."""
        resp = self.response()
        resp.headers.update(headers or {})
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        if self.status != 413 and request.protocol is not None:  # 413: let aiohttp drain what was sent
            request.protocol.force_close()
        return resp


async def read_body(request: web.Request, timeout_s: float | None) -> bytes:
    """The whole (decompressed) body within `timeout_s`, or BodyError(408/413/400)."""
    try:
        if request.content.is_eof():  # all of it came with the headers (the usual small body): no wait to bound
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyError(408, f"request body not received within {timeout_s:g}s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"request body too large (limit {request.client_max_size} bytes)") from None
    except web.HTTPException as exc:  # e.g. a corrupt gzip body surfaces as 400 from aiohttp
        raise BodyError(exc.status if 400 <= exc.status < 500 else 400,
                        f"cannot read request body: {exc.reason}") from None
    except (ValueError, OSError, EOFError) as exc:  # zlib/brotli errors, broken chunking, client reset
        raise BodyError(400, f"cannot read request body: {exc.__class__.__name__}") from None
    except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors (ContentEncodingError ...) vary by version
        if exc.__class__.__module__.startswith("aiohttp"):
            raise BodyError(400, f"cannot read request body: {exc.__class__.__name__}") from None
        raise


def _too_deep(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def _has_lone_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON object from `raw`, or BodyError(400) saying what is wrong. Cheap on ordinary bodies: the
    depth and surrogate walks run only when a quick byte count says they could matter."""
    try:
        body = json.loads(raw)
    except RecursionError:  # json.loads recurses in C: a deep enough array is not a ValueError
        raise BodyError(400, f"request body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BodyError(400, "request body must be a JSON object")
    if raw.count(b"[") + raw.count(b"{") > max_depth and _too_deep(body, max_depth):
        raise BodyError(400, f"request body nests deeper than {max_depth} levels")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise BodyError(400, "request body contains a lone UTF-16 surrogate escape (e.g. \\udc80), "
                        "which is not a character")
    return body


async def read_json_object(request: web.Request, timeout_s: float | None) -> dict[str, Any]:
    """`read_body` then `parse_json_object`: the body as a dict, or BodyError."""
    return parse_json_object(await read_body(request, timeout_s))


class _JsonErrorRequestHandler(web_protocol.RequestHandler):
    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback: a bug of ours
        elif request.writer.output_size > 0:  # a client's malformed request: no traceback in the log
            raise ConnectionError("response already started, cannot send the error")
        text = message if status < 500 and message else HTTPStatus(status).phrase
        out = error_response(text[:500], status)
        out.force_close()
        return out


class _JsonErrorServer(web_server.Server):
    __slots__ = ()

    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def install_json_protocol_errors(runner: web.BaseRunner) -> None:
    """After `runner.setup()`: connections accepted from now on answer protocol errors in JSON."""
    server = runner.server
    if server is not None and type(server) is web_server.Server:
        server.__class__ = _JsonErrorServer
