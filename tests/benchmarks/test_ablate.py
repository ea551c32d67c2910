"""benchmarks.ablate: our router with parts taken out (`benchmarks.lib.ablations`), side by side.

The ablations patch the router's internals by name, so a rename there must fail here: one router runs with
every ablation at once and has to route.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ablate import contender, parse_args
from benchmarks.lib.ablations import ABLATIONS, bootstrap
from benchmarks.lib.defaults import ROOT


def test_an_ablated_router_is_our_cli_started_after_the_ablations_are_applied(tmp_path: Path) -> None:
    c = contender("no-metrics+no-usage", "cost")
    argv = c.argv(8123, ["http://127.0.0.1:9001"], tmp_path)
    assert argv[1:3] == ["-c", bootstrap(["no-metrics", "no-usage"])] and argv[3] == "--config"
    assert contender("base", "cost").argv(8123, ["http://127.0.0.1:9001"], tmp_path)[1:3] == ["-m", "router"]
    assert contender("floor", "cost").kind == "aiohttp-floor"


def test_an_unknown_ablation_is_refused_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--variants", "base,no-metrics+no-such-part"])
    assert exc.value.code == 2
    assert "unknown ablation 'no-such-part'" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_every_ablation_applies_and_the_router_still_routes(tmp_path: Path) -> None:
    everything = "+".join(ABLATIONS)
    out = tmp_path / "ablate.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ablate", "--variants", f"base,{everything},floor",
                           "--requests", "6", "--warmup", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {v["name"]: v for v in json.loads(out.read_text())["variants"]}
    assert set(rows) == {"base", everything, "aiohttp-floor"}
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        (level,) = row["levels"]
        assert level["router"]["requests"] == 6 and level["router"]["errors"] == 0, name
    assert "vs base" in proc.stdout
