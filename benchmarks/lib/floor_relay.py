"""The least a router built like ours can cost: an aiohttp server relaying to the engines, nothing else.

    python -m benchmarks.lib.floor_relay --port 8100 --upstream http://127.0.0.1:8001 http://127.0.0.1:8002

`benchmarks.overhead` runs it as the contender ``aiohttp-floor``, beside our router and the Rust peers, to
split what our router costs per streamed request into what its stack costs (this relay) and what its own
work adds (ours minus this relay). It is our router's request path with everything a router decides
taken out: the same server (aiohttp's web server under uvloop, access log off) and the same upstream
client (`router.proxy.http1`), but the request body is not parsed, hashed or validated, there is no policy
(round robin), no admission, retries, metrics, logs, request ids or usage reading, and the answer's bytes
are written as they arrive. Not a router anyone should run: it exists to be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Sequence

from aiohttp import web

from router.proxy.http1 import Response, UpstreamPool

FORWARDED = ("content-type", "authorization")  # request headers passed on
HEAD_S = 30.0


async def relay_once(request: web.Request, pool: UpstreamPool, upstream_url: str) -> web.StreamResponse:
    """Send the request's body to ``upstream_url`` + its path and write the answer back as it arrives."""
    body = await request.read()
    headers = {k: v for k in FORWARDED if (v := request.headers.get(k)) is not None}
    upstream = await pool.post(upstream_url + request.path, body, headers, connect_s=5.0, head_s=HEAD_S)
    try:
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": upstream.header("content-type", "application/json") or "application/json"})
        await response.prepare(request)
        await copy_body(upstream, response)
        await response.write_eof()
        return response
    finally:
        upstream.close()


async def copy_body(upstream: Response, client: web.StreamResponse) -> float | None:
    """Write the upstream body to ``client`` as it arrives; when its first bytes were written (monotonic)."""
    first = None
    read, wait = upstream.read_nowait, upstream.wait
    while True:
        chunk = read()
        while chunk is None:
            await wait()
            chunk = read()
        if not chunk:
            return first
        await client.write(chunk)
        if first is None:
            first = time.monotonic()


def create_app(upstreams: Sequence[str]) -> web.Application:
    app = web.Application()
    turn = itertools.cycle(upstreams)
    pool: list[UpstreamPool] = []

    async def on_startup(_: web.Application) -> None:
        pool.append(UpstreamPool())

    async def on_cleanup(_: web.Application) -> None:
        await pool[0].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        return await relay_once(request, pool[0], next(turn))

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_post("/v1/completions", relay)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lib.floor_relay",
                                description="A bare aiohttp relay (no routing) measured beside routers.")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    p.add_argument("--port", type=int, required=True, help="listen port")
    p.add_argument("--upstream", nargs="+", required=True, metavar="URL", help="engine base URLs, round robin")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(create_app([u.rstrip("/") for u in args.upstream]), host=args.host, port=args.port,
                access_log=None, print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
