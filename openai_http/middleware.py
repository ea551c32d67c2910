"""The outermost middleware of both servers: a request id on every request and an OpenAI error body for
every failure, including aiohttp's own 404/405/413 and a handler's bug (a 500, logged with the id)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from openai_http.errors import error_response

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = web.RequestKey("request_id", str)
MAX_REQUEST_ID_CHARS = 128
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def request_id(request: web.Request) -> str:
    """The client's ``X-Request-Id`` if it is sane (it is echoed, logged and forwarded), else a new one."""
    rid = request.headers.get(REQUEST_ID_HEADER, "")
    if 0 < len(rid) <= MAX_REQUEST_ID_CHARS and rid.isascii() and rid.isprintable():
        return rid
    return os.urandom(16).hex()  # 32 hex digits like uuid4().hex, without building a UUID


def request_id_and_errors(log: logging.Logger, internal_error: str) -> Middleware:
    """The middleware: sets ``request[REQUEST_ID]`` and echoes it in the response (unless the handler
    already set it), and answers exceptions in OpenAI's format; ``internal_error`` is the 500's message."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request[REQUEST_ID] = request_id(request)
        try:
            resp = await handler(request)
        except web.HTTPNotFound:
            resp = error_response(f"no route for {request.method} {request.path}", 404)
        except web.HTTPMethodNotAllowed:
            resp = error_response(f"method {request.method} not allowed on {request.path}", 405)
        except web.HTTPRequestEntityTooLarge:
            resp = error_response(f"request body too large (limit {request.client_max_size} bytes)", 413)
        except web.HTTPException as exc:
            resp = error_response(exc.reason or "error", exc.status)
        except Exception:  # a bug must still answer in OpenAI format, and be logged with its request id
            log.exception("unhandled error rid=%s %s %s", rid, request.method, request.path)
            resp = error_response(internal_error, 500)
        if not resp.prepared:
            resp.headers.setdefault(REQUEST_ID_HEADER, rid)
        return resp

    return middleware
