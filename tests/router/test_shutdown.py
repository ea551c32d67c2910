"""Graceful shutdown: on SIGTERM the router stops taking requests and lets in-flight streams finish."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp

from tests.conftest import SimServerFactory, free_port


async def test_sigterm_lets_an_in_flight_stream_finish_and_refuses_new_work(sim_server: SimServerFactory) -> None:
    engine = await sim_server(profile="llmd-8b", time_scale=1.0)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "--port", str(port), "--replica",
                             str(engine.make_url("")).rstrip("/"), "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            body = {"model": "sim-model", "prompt": "hello", "max_tokens": 40, "stream": True}
            r = await s.post(base + "/v1/completions", json=body)  # ~0.5 s of streaming at 12 ms/token
            await r.content.readuntil(b"\n\n")
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with s.get(base + "/health") as h:
                assert h.status == 503  # draining: load balancers stop sending
            rest = await asyncio.wait_for(r.read(), 10)
            assert rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
