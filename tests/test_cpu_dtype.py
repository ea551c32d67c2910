"""CPU dtype choice: bf16 only where a child process really ran it; the verdict is cached per machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine_server.backend import BackendError
from engine_server.cpu_dtype import (
    CACHE_ENV,
    DtypeChoice,
    choose_cpu_dtype,
    describe_exit,
    probe_bf16,
    remember_cpu_dtype,
)
from engine_server.vllm_backend import VllmBackend, VllmConfig, explain_engine_death

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


def test_a_remembered_verdict_replaces_the_probes(tmp_path: Path) -> None:
    assert choose_cpu_dtype(advertised=True, probe_command=HEALTHY_CHILD, directory=tmp_path).dtype == "bfloat16"
    remember_cpu_dtype(DtypeChoice("float32", "an engine died in bf16"), directory=tmp_path)
    marker = tmp_path / "probed"
    again = choose_cpu_dtype(advertised=True, probe_command=must_not_run(marker), directory=tmp_path)
    assert again.dtype == "float32" and "an engine died in bf16" in again.reason and not marker.exists()


# --- the engine server's last word: an engine that dies starting in the probe's bf16 ------------------


class StartsOnlyInFloat32(VllmBackend):
    """A backend whose engine dies starting unless the float32 fallback is on (no vLLM needed)."""

    def __init__(self, probe_chose_bf16: bool) -> None:
        super().__init__(VllmConfig(model="tiny"))
        self.starts: list[str | None] = []
        self.chose = probe_chose_bf16

    def _probe_chose_bf16(self) -> bool:
        return self.chose and self._dtype_fallback is None

    async def _start_once(self) -> None:
        self.starts.append(self._dtype_fallback)
        assert self.failure is None  # the server exits as soon as the backend reports a failure
        if self._dtype_fallback != "float32":
            raise BackendError("vLLM engine failed its warm-up request: vLLM engine died", status=503)


async def test_an_engine_that_dies_in_the_probes_bf16_starts_again_in_float32_and_remembers_it(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    backend = StartsOnlyInFloat32(probe_chose_bf16=True)
    await backend.start()
    assert backend.starts == [None, "float32"]
    verdict = choose_cpu_dtype(advertised=True, probe_command=must_not_run(tmp_path / "probed"))
    assert verdict.dtype == "float32" and "died starting in bfloat16" in verdict.reason


async def test_a_bf16_the_user_asked_for_is_not_replaced(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    backend = StartsOnlyInFloat32(probe_chose_bf16=False)
    with pytest.raises(BackendError, match="warm-up"):
        await backend.start()
    assert backend.starts == [None] and not list(tmp_path.glob("cpu-dtype-*.json"))
    assert backend.failure is not None and "warm-up" in backend.failure
