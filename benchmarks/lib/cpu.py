"""CPU seconds from /proc: of given processes, of this one and of the whole host, so a benchmark can say
what the router cost and whether other jobs on the machine disturbed the run."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over CPUs (Linux /proc/stat)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return math.nan, math.nan
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


class CpuWatch:
    """CPU used between `start()` and `stop()`: by given processes, by this one, and by everything else.

    ``other_share`` (busy CPU not used by the watched processes or this one, as a share of all CPUs) flags
    runs disturbed by other jobs on the machine.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.used: list[float] = []  # per watched pid, then this process
        self.busy_share = math.nan
        self.other_share = math.nan
        self._t0: tuple[tuple[float, float], list[float]] | None = None

    def _sample(self) -> list[float]:
        return [cpu_seconds(p) for p in self.pids] + [time.process_time()]

    def start(self) -> CpuWatch:
        self._t0 = (host_cpu_seconds(), self._sample())
        return self

    def stop(self) -> CpuWatch:
        assert self._t0 is not None, "start() first"
        (busy0, total0), used0 = self._t0
        (busy1, total1), used1 = host_cpu_seconds(), self._sample()
        self.used = [b - a for a, b in zip(used0, used1, strict=True)]
        busy, total = busy1 - busy0, total1 - total0
        if total > 0:
            self.busy_share = busy / total
            self.other_share = max(0.0, busy - sum(self.used)) / total
        return self
