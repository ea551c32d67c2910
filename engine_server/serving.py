"""Run an aiohttp app until SIGTERM/SIGINT, then drain: stop taking work, finish in-flight, exit."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable

from aiohttp import web

from openai_http import install_json_protocol_errors

log = logging.getLogger("engine_server")


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


FAILURE_POLL_S = 0.5


async def serve(app: web.Application, host: str, port: int, *, grace_s: float,
                begin_drain: Callable[[], None], in_flight: Callable[[], int],
                failure: Callable[[], str | None] = lambda: None) -> int:
    """Serve until a signal (then drain, return 0) or until `failure()` says the engine is dead (return 1
    at once: a supervisor restarts a process that exits, never one that answers 503 forever). Handlers
    whose client disconnected are cancelled, so engines see the abort."""
    # keepalive_timeout also bounds how long a new connection may take to send its request headers
    # (aiohttp's default is about an hour); the router closes its idle pooled connections after 30 s.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=75)
    await runner.setup()
    install_json_protocol_errors(runner)  # aiohttp's own 400s (bad request line, header flood) as JSON
    gc.collect()  # start-up objects live forever: keep full collections short (no stalls mid-stream)
    gc.freeze()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("listening on http://%s:%d", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch_failure(failure, stop))
    try:
        await stop.wait()
        if (why := failure()) is not None:
            log.error("engine failed, exiting with status 1: %s", why)
            return 1
        begin_drain()
        deadline = time.monotonic() + grace_s
        log.info("draining: %d request(s) in flight, grace %.0fs", in_flight(), grace_s)
        while in_flight() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if in_flight() > 0:
            log.warning("grace period over, cancelling %d request(s)", in_flight())
        return 0
    finally:
        watch.cancel()
        await runner.cleanup()
        log.info("stopped")


async def _watch_failure(failure: Callable[[], str | None], stop: asyncio.Event) -> None:
    while failure() is None:
        await asyncio.sleep(FAILURE_POLL_S)
    stop.set()
