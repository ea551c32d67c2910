"""A tiny `python -m benchmarks.compare` run end to end: every contender gets a row, nothing is dropped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compare import contenders, parse_args, parse_sets, workloads_for
from benchmarks.lib.acceptance import verdict

ROOT = Path(__file__).resolve().parents[2]


def test_set_overrides_apply_to_the_workloads_that_have_the_parameter() -> None:
    args = parse_args(["--workloads", "gsp,multiturn", "--set", "groups=3", "--set", "turns=2", "--set",
                       "questions=1"])
    g, m = workloads_for(args)
    assert (g.params["groups"], g.params["questions"], m.params["turns"]) == (3, 1, 2)
    assert parse_sets(["ratios=0.2,0.8"]) == {"ratios": (0.2, 0.8)}
    with pytest.raises(SystemExit):
        parse_sets(["groups"])


def row(name: str, kind: str, p90: float, hit_vs_oracle: float = 1.0, failed: int = 0) -> dict:
    return {"contender": name, "kind": kind, "load": "c=4", "hit_vs_oracle": hit_vs_oracle,
            "summary": {"ok": 10, "failed": failed, "ttft_ms": {"p90": p90}}}


def test_verdict_judges_our_default_against_the_best_other_router() -> None:
    v = verdict([row("cost", "ours", 60.0, 0.97), row("round_robin", "ours", 10.0),
                 row("sglang:cache_aware", "sglang-router", 100.0), row("vllm-router:power_of_two", "vllm-router",
                                                                         90.0)], 0.8)["c=4"]
    assert v["best_peer"] == "vllm-router:power_of_two" and v["ttft_p90_ratio"] == pytest.approx(0.667, abs=1e-3)
    assert v["ttft_goal_0.7_met"] and v["hit_goal_0.95_met"]


def test_a_default_that_sheds_load_does_not_pass() -> None:
    v = verdict([row("cost", "ours", 10.0, failed=3), row("sglang:round_robin", "sglang-router", 100.0)], 0.8)
    assert not v["c=4"]["ttft_goal_0.7_met"]


def test_pinned_is_ours_and_sends_the_session_header() -> None:
    (pinned,) = [c for c in contenders(parse_args(["--no-peers"])) if c.name == "pinned"]
    assert (pinned.kind, pinned.policy, pinned.session_header) == ("ours", "consistent_hash", "x-session-id")


@pytest.mark.slow
def test_tiny_compare_run_has_a_row_for_every_contender(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "benchmarks.compare", "--workloads", "gsp,multiturn", "--profile", "instant",
            "--engines", "2", "--concurrency", "2", "--warmup", "1", "--policies", "cost,round_robin,pinned",
            "--peers", "sglang:cache_aware,vllm-router:cache_aware",
            "--set", "groups=2", "--set", "questions=2", "--set", "conversations=2", "--set", "turns=2",
            "--set", "system_tokens=64", "--name", "tiny", "--out-dir", str(tmp_path), "--no-progress"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "tiny.json").read_text())
    names = [c["name"] for c in data["contenders"]]
    assert {"cost", "round_robin", "pinned"} <= set(names)
    for res in data["results"]:  # pinned only where sessions have several turns
        assert [r["contender"] for r in res["rows"]] == [n for n in names if n != "pinned" or
                                                         res["workload"] == "multiturn"]
        assert {line["check"].split(":")[0] for line in res["acceptance"]} == {res["workload"]}
        assert 0 < res["oracle"]["hit_rate"] <= 1
        for r in res["rows"]:
            if r["kind"] == "ours":
                assert r["summary"]["ok"] == res["requests"] and r["summary"]["failed"] == 0, r
                assert sum(r["summary"]["per_replica"].values()) == res["requests"]
            else:  # a peer either ran (with its command line recorded) or says why not
                assert ("summary" in r and r["argv"]) or r["error"], r
        assert (tmp_path / f"tiny-{res['workload']}.png").stat().st_size > 10_000
    assert "cost" in proc.stdout and "oracle" in proc.stdout
    assert "multiturn: cost hit rate >= 0.95 x pinned" in proc.stdout  # quality's lines are compare's


@pytest.mark.slow
async def test_compare_against_running_replicas_sends_every_run_fresh_text(tmp_path: Path) -> None:
    from benchmarks.lib.fleet import EngineSpec, Fleet

    async with Fleet(2, EngineSpec(profile="instant", num_blocks=256)) as fleet:
        argv = [sys.executable, "-m", "benchmarks.compare", "--workloads", "gsp", "--engine-urls",
                ",".join(fleet.engine_urls), "--policies", "cost,round_robin", "--no-peers", "--concurrency", "2",
                "--warmup", "1", "--set", "groups=2", "--set", "questions=2", "--set", "system_tokens=64",
                "--name", "ext", "--out-dir", str(tmp_path), "--no-progress", "--no-plots"]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, out.decode()[-3000:]
    data = json.loads((tmp_path / "ext.json").read_text())
    (res,) = data["results"]
    assert res["kv_blocks_per_replica"] == 256  # read from the replicas' /load
    seeds = [r["workload_seed"] for r in res["rows"]]
    assert len(set(seeds)) == len(seeds) == 2
    assert all(r["summary"]["ok"] == 4 and r["summary"]["failed"] == 0 for r in res["rows"])
