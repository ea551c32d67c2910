"""One engine server as a subprocess in its own process group (for engines that are not a sim `Fleet`,
such as a real vLLM server): started until healthy, stopped with its whole group."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.lib.client import healthy
from benchmarks.lib.defaults import HOST, ROOT


class EngineProcess:
    """One engine server subprocess in its own process group, so that stopping it also reaps vLLM's
    engine-core child even if the server dies without cleaning up."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.name, self.argv, self.env = name, argv, dict(env or os.environ)
        self.log_path = log_dir / f"{name}.log"
        self.url = f"http://{HOST}:{argv[argv.index('--port') + 1]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = math.nan

    async def start(self, timeout_s: float) -> EngineProcess:
        t0 = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + timeout_s
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during start-up:\n{tail}")
                if await healthy(s, self.url, timeout_s=2.0):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not healthy after {timeout_s:g}s (log: {self.log_path})")
                await asyncio.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL the whole group (only what this process started)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (e.g. vLLM's EngineCore)
        if proc.poll() is None:
            proc.wait(5)

    async def load(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/load") as r:
            return dict(await r.json())
