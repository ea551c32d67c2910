"""An engine is healthy only once it has proved it serves, and an engine that died makes its server exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from engine_server.vllm_backend import VllmBackend, VllmConfig
from tests.conftest import SimServerFactory, free_port


class _FakeEngine:
    """What VllmBackend.start() reads from an AsyncLLM, with no engine behind it."""

    errored = False

    def __init__(self) -> None:
        self.vllm_config = SimpleNamespace(
            cache_config=SimpleNamespace(block_size=32, num_gpu_blocks=64),
            scheduler_config=SimpleNamespace(max_num_seqs=8),
            model_config=SimpleNamespace(max_model_len=512, dtype="torch.bfloat16"))

    def get_tokenizer(self) -> Any:
        return object()


async def test_a_vllm_backend_is_not_ready_until_its_warmup_request_passed(monkeypatch) -> None:
    backend = VllmBackend(VllmConfig(model="tiny"))
    warmup_may_end = asyncio.Event()

    async def warmup() -> None:
        await warmup_may_end.wait()

    monkeypatch.setattr(backend, "_build_engine", lambda box: box.append(_FakeEngine()))
    monkeypatch.setattr(backend, "_warmup", warmup)
    monkeypatch.setattr("engine_server.vllm_backend._shutdown", lambda engine: None)
    start = asyncio.create_task(backend.start())
    while backend.engine is None:  # the engine exists, the warm-up request is still running
        await asyncio.sleep(0.01)
    assert not backend.ready
    warmup_may_end.set()
    await start
    assert backend.ready and backend.failure is None
    await backend.stop()


async def test_a_vllm_engine_that_fails_its_warmup_reports_why_with_the_dtype_flag(monkeypatch) -> None:
    backend = VllmBackend(VllmConfig(model="tiny"))

    async def warmup() -> None:
        raise RuntimeError("EngineCore died unexpectedly")

    monkeypatch.setattr(backend, "_build_engine", lambda box: box.append(_FakeEngine()))
    monkeypatch.setattr(backend, "_warmup", warmup)
    monkeypatch.setattr("engine_server.vllm_backend._shutdown", lambda engine: None)
    with pytest.raises(Exception, match="warm-up"):
        await backend.start()
    assert not backend.ready
    assert backend.failure is not None and "--dtype float32" in backend.failure


async def test_a_vllm_engine_that_dies_after_start_reports_a_failure(monkeypatch) -> None:
    backend = VllmBackend(VllmConfig(model="tiny"))
    engine = _FakeEngine()

    async def warmup() -> None:
        pass

    monkeypatch.setattr(backend, "_build_engine", lambda box: box.append(engine))
    monkeypatch.setattr(backend, "_warmup", warmup)
    monkeypatch.setattr("engine_server.vllm_backend._shutdown", lambda engine: None)
    await backend.start()
    engine.errored = True
    assert not backend.ready
    assert backend.failure is not None and "engine core died" in backend.failure
    await backend.stop()


async def test_health_names_the_failure_of_a_dead_engine(sim_server: SimServerFactory) -> None:
    srv = await sim_server(faults={"die_after_s": 0.05})
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s, s.get(srv.make_url("/health")) as r:
        assert r.status == 503
        body = await r.json()
    assert "engine failed" in body["error"]["message"] and "died" in body["error"]["message"]


@pytest.mark.parametrize("die_after_s", ["0", "0.5"])
def test_an_engine_server_whose_engine_fails_or_dies_exits_1_saying_why(die_after_s: str) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "engine_server", "--backend", "sim", "--port", str(free_port()),
         "--fault-die-after-s", die_after_s], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "engine failed, exiting with status 1" in proc.stderr
    assert "fault injection" in proc.stderr
    assert time.monotonic() - t0 < 50  # did not wait for a signal: only a hang guard, not a speed check


def test_the_launcher_gives_up_on_a_replica_that_cannot_start_and_shows_its_last_lines() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine_server", "launch", "--cpu-replicas", "1", "--backend", "sim",
         "--model", "m", "--base-port", str(free_port()), "--health-timeout-s", "120",
         "--max-start-failures", "2", "--", "--fault-die-after-s", "0"],
        capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1
    assert "replica-0 exit 1 before it became healthy, 2 time(s); gave up" in proc.stderr
    assert "simulated engine failed to start" in proc.stderr  # its last lines, quoted by the launcher
    assert "replicas ready" not in proc.stdout


@pytest.mark.slow
def test_the_launcher_restarts_a_replica_whose_engine_died_and_says_why() -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-m", "engine_server", "launch", "--cpu-replicas", "1", "--backend", "sim",
         "--model", "m", "--base-port", str(free_port()), "--health-timeout-s", "120", "--shutdown-grace-s", "5",
         "--", "--profile", "instant", "--fault-die-after-s", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        assert launcher.stderr is not None
        deadline = time.monotonic() + 120  # a hang guard: the restart comes ~3 s after start
        while time.monotonic() < deadline:
            line = launcher.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "simulated engine died" in line and any("restart 1" in ln for ln in seen):
                break
    finally:
        launcher.terminate()
        seen.append(launcher.communicate(timeout=60)[1])
    err = "".join(seen)
    assert "replica-0 healthy" in err  # healthy first, then its engine died
    assert "replica-0 exit 1; restart 1" in err
    assert "simulated engine died 2s after start" in err  # its last lines, quoted by the launcher


class _SlowTokenizingSim:
    """Wraps a sim backend so that counting a long prompt's tokens blocks (as vLLM's tokenizer does for
    megabytes) until the test lets it go, or a 10 s guard passes."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def count_tokens(self, text: str) -> int:
        if len(text) > 100_000:
            self.entered.set()
            self.release.wait(timeout=10)
        return self._backend.count_tokens(text)


async def test_tokenizing_a_huge_prompt_does_not_stall_health_checks() -> None:
    from aiohttp.test_utils import TestServer

    from engine_server.app import create_app
    from engine_server.sim.backend import SimBackend, SimConfig

    sim = SimBackend(SimConfig(model_name="sim-model", profile="instant"))
    slow = _SlowTokenizingSim(sim)
    server = TestServer(create_app(slow), host="127.0.0.1")  # type: ignore[arg-type]
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            huge = s.post(server.make_url("/v1/completions"),
                          json={"model": "sim-model", "prompt": "x" * 1_000_000, "max_tokens": 1})
            pending = asyncio.create_task(huge.__aenter__())
            while not slow.entered.is_set():
                await asyncio.sleep(0.01)
            async with s.get(server.make_url("/health")) as r:
                assert r.status == 200
            assert not slow.release.is_set() and not pending.done()  # answered while still tokenizing
            slow.release.set()
            resp = await pending
            assert resp.status == 400  # far over the sim's context length
            resp.release()
    finally:
        slow.release.set()
        await server.close()


def test_a_prompt_too_long_for_any_tokenization_is_counted_without_tokenizing() -> None:
    backend = VllmBackend(VllmConfig(model="tiny", max_model_len=100))
    backend.max_token_chars = 10

    class Refuses:
        def encode(self, *a: Any, **k: Any) -> list[int]:
            raise AssertionError("tokenized a prompt that cannot fit")

    backend._tokenizer = Refuses()
    assert backend.count_tokens("x" * 5_000) > backend.max_model_len


class _EngineWithHandler(_FakeEngine):
    """An AsyncLLM's output handler: a task that waits for the engine core's outputs until cancelled."""

    def __init__(self, unfinished: int) -> None:
        super().__init__()
        self.unfinished = unfinished
        self.output_handler = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        self.handler_done_at_shutdown: bool | None = None

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished


@pytest.mark.parametrize(("unfinished", "cancelled_first"), [(0, True), (2, False)])
async def test_stopping_cancels_the_output_handler_before_the_engine_core_only_when_no_request_waits(
        monkeypatch, unfinished: int, cancelled_first: bool) -> None:
    backend = VllmBackend(VllmConfig(model="tiny"))
    engine = _EngineWithHandler(unfinished)

    def shutdown(e: _EngineWithHandler) -> None:
        e.handler_done_at_shutdown = e.output_handler.done()

    monkeypatch.setattr(backend, "_build_engine", lambda box: box.append(engine))
    monkeypatch.setattr(backend, "_warmup", lambda: asyncio.sleep(0))
    monkeypatch.setattr("engine_server.vllm_backend._shutdown", shutdown)
    await backend.start()
    await backend.stop()
    assert engine.handler_done_at_shutdown is cancelled_first
    engine.output_handler.cancel()
