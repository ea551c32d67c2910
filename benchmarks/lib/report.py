"""Output of a benchmark: what it ran on, plain tables, its JSON file, and the `main` wrapper that ties them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.lib.defaults import ROOT


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including the load average at the start (other processes)."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["mem_gib"] = round(mem_kb / 2**20, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = _git("rev-parse", "--short", "HEAD")
        # uncommitted changes to the code under test, if any (read-only query)
        info["modified"] = _git("status", "--porcelain", "--untracked-files=no", "--", "router", "engine_server",
                                "config").split()[1::2]
    return info


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; floats are shown with up to 3 decimals."""
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "nan" if math.isnan(x) else f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1e6 else f"{x:.3g}"
        return str(x)

    text = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


def run_benchmark(amain: Callable[[], Awaitable[dict[str, Any]]], path: Path) -> int:
    """Run a benchmark's coroutine on uvloop, stamp the end load average, write its JSON to ``path``."""
    install_uvloop()
    out = asyncio.run(amain())
    out.setdefault("machine", machine_info())["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    write_json(path, out)
    print(f"\nwrote {path}")
    return 0


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
