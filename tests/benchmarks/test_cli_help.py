"""The benchmark commands' --help says each default once, and never "(default: None)"."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["compare", "simulate", "fidelity", "processes", "evict_sweep"])
def test_help_says_each_default_once(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{command}", "--help"], capture_output=True,
                         text=True, timeout=120, env={"COLUMNS": "1000", "PATH": ""}).stdout
    assert "usage:" in out
    flags = [ln for ln in out.splitlines() if ln.lstrip().startswith("-")]
    assert flags
    for line in flags:
        assert len(re.findall(r"\(default", line)) <= 1, line
        assert "(default: None)" not in line and "(default: False)" not in line, line
