"""CPU dtype choice: bf16 only where a child process really ran it; the verdict is cached per machine."""

from __future__ import annotations

import sys
from pathlib import Path

from engine_server.cpu_dtype import choose_cpu_dtype, describe_exit, probe_bf16
from engine_server.vllm_backend import explain_engine_death

SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
HEALTHY_CHILD = [sys.executable, "-c", "pass"]


def must_not_run(marker: Path) -> list[str]:
    """A probe command that leaves a file behind if it runs (so a test can tell the cache was used)."""
    return [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]


def test_a_probe_child_killed_by_sigill_is_reported_as_an_illegal_instruction() -> None:
    ok, what = probe_bf16(SIGILL_CHILD)
    assert not ok
    assert "SIGILL (illegal instruction)" in what


def test_a_cpu_that_advertises_bf16_but_dies_running_it_gets_float32_and_says_why(tmp_path: Path) -> None:
    choice = choose_cpu_dtype(advertised=True, probe_command=SIGILL_CHILD, directory=tmp_path)
    assert choice.dtype == "float32"
    assert "SIGILL" in choice.reason and "AVX512-BF16/AMX" in choice.reason


def test_a_cpu_that_runs_the_bf16_probe_keeps_bf16(tmp_path: Path) -> None:
    assert choose_cpu_dtype(advertised=True, probe_command=HEALTHY_CHILD, directory=tmp_path).dtype == "bfloat16"


def test_a_cpu_without_native_bf16_gets_float32_without_a_probe(tmp_path: Path) -> None:
    marker = tmp_path / "probed"
    choice = choose_cpu_dtype(advertised=False, probe_command=must_not_run(marker), directory=tmp_path)
    assert choice.dtype == "float32" and "no native bf16" in choice.reason
    assert not marker.exists()


def test_the_verdict_is_cached_per_machine_so_the_probe_runs_once(tmp_path: Path) -> None:
    first = choose_cpu_dtype(advertised=True, probe_command=SIGILL_CHILD, directory=tmp_path)
    marker = tmp_path / "probed"
    again = choose_cpu_dtype(advertised=True, probe_command=must_not_run(marker), directory=tmp_path)
    assert (first.dtype, again.dtype) == ("float32", "float32")
    assert "cached" in again.reason and not marker.exists()


def test_exit_codes_read_as_people_say_them() -> None:
    assert describe_exit(1) == "exit 1"
    assert describe_exit(-4) == "killed by SIGILL (illegal instruction)"
    assert describe_exit(-9) == "killed by SIGKILL"


class _DeadEngine:
    """Just enough of AsyncLLM for the exit codes of its engine core processes."""

    def __init__(self, codes: dict[str, int]) -> None:
        manager = type("M", (), {"finished_procs": lambda self: codes})()
        resources = type("R", (), {"engine_manager": manager})()
        self.engine_core = type("C", (), {"resources": resources})()


def test_an_engine_core_killed_by_sigill_names_the_flag_that_avoids_it() -> None:
    why = explain_engine_death("the vLLM engine core died", _DeadEngine({"EngineCore_DP0": -4}), "bfloat16")
    assert "EngineCore_DP0 killed by SIGILL" in why
    assert "--dtype float32" in why


def test_a_float32_engine_death_does_not_blame_the_dtype() -> None:
    why = explain_engine_death("the vLLM engine core died", _DeadEngine({"EngineCore_DP0": 1}), "float32")
    assert "EngineCore_DP0 exit 1" in why and "--dtype" not in why
