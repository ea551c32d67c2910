"""`benchmarks.processes` tells the K policies how many processes share the traffic unless asked not to, as
`benchmarks.compare` does (``--untold-processes`` in both)."""

from __future__ import annotations

from benchmarks import processes


def test_the_processes_are_told_how_many_they_are_by_default():
    assert processes.told({"agree": False}, 4, tell=True) == {"agree": False, "router_processes": 4}


def test_untold_processes_run_as_lone_routers():
    assert processes.told({"agree": False}, 4, tell=False) == {"agree": False}


def test_the_flag_is_an_opt_out(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(processes, "run_cell", lambda engine, workload, policy, params, *a, **kw: seen.append(
        params) or {"hit_rate": 0.5, "ttft_p90_ms": 100.0})
    out = str(tmp_path / "r.json")
    processes.main(["--engines", "llmd-8b", "--workloads", "gsp", "--seeds", "1", "--out", out])
    processes.main(["--engines", "llmd-8b", "--workloads", "gsp", "--seeds", "1", "--out", out, "--untold-processes"])
    assert seen == [{"router_processes": 1}, {"router_processes": 4}, {}, {}]


def test_the_poll_interval_reaches_every_run(monkeypatch, tmp_path):
    polls = []
    monkeypatch.setattr(processes, "run_cell", lambda *a, poll_s, **kw: polls.append(poll_s) or {
        "hit_rate": 0.5, "ttft_p90_ms": 100.0})
    processes.main(["--engines", "llmd-8b", "--workloads", "gsp", "--seeds", "1", "--out", str(tmp_path / "r.json"),
                    "--poll-s", "0.05"])
    assert polls == [0.05, 0.05]
