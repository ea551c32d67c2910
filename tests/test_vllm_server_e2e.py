"""End to end on a REAL vLLM-CPU engine server (`python -m engine_server --backend vllm`) with the generated
tiny model, plus the router in front of it, and parity with the sim backend.

One engine server process for the module (startup ~20-60 s on CPU). Run alone with `pytest -m vllm`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

pytest.importorskip("vllm")

from engine_server.app import create_app  # noqa: E402
from engine_server.metrics import METRIC_NAMES  # noqa: E402
from engine_server.sim.backend import SimBackend, SimConfig  # noqa: E402
from engine_server.tiny_model import generate as generate_tiny_model  # noqa: E402
from tests.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

MODEL = "tiny"
PREFIX = "You are a helpful assistant. Answer briefly and politely, in plain words. " * 12



def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class Engine:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path  # the server's stdout and stderr

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model = generate_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log = tmp_path_factory.mktemp("engine-log") / "engine.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine_server", "--backend", "vllm", "--model", str(model),
             "--served-model-name", MODEL, "--port", str(port), "--max-model-len", "1024", "--max-num-seqs",
             "8", "--shutdown-grace-s", "5"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/health", proc, 600)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; the engine server's last output:\n{log.read_text()[-4000:]}") from exc
        yield Engine(url, proc, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def engine_url(engine: Engine) -> str:
    return engine.url


@pytest.fixture(scope="module")
def router_url(engine_url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "--port", str(port), "--replica",
                             f"engine={engine_url}", "--policy", "cost"])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, 60)
        yield url
    finally:
        stop(proc)


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


async def test_repeated_prefix_is_served_from_the_prefix_cache(engine_url: str, http: aiohttp.ClientSession) -> None:
    url = engine_url + "/v1/chat/completions"
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": PREFIX},
                                                          {"role": "user", "content": "first"}]}
    status, first = await post(http, url, body)
    assert status == 200
    body["messages"][1]["content"] = "second"
    _, second = await post(http, url, body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] < second["usage"]["prompt_tokens"]


async def test_openai_sdk_streams_from_the_engine(engine_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=engine_url + "/v1", api_key="none")
    stream = await client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    await client.close()
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


async def test_client_disconnect_aborts_the_engine_request(engine_url: str, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    r = await http.post(engine_url + "/v1/completions", json=body)
    await r.content.readuntil(b"\n\n")
    r.close()
    deadline = time.monotonic() + 60  # a hang guard
    while time.monotonic() < deadline:
        async with http.get(engine_url + "/load") as lr:
            load = await lr.json()
        if load["num_requests_running"] == 0 and load["in_flight"] == 0:
            break
        await asyncio.sleep(0.1)
    assert load["num_requests_running"] == 0 and load["in_flight"] == 0


async def test_openai_sdk_streams_through_the_router(router_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=router_url + "/v1", api_key="none")
    messages = [{"role": "system", "content": PREFIX}, {"role": "user", "content": "hi"}]
    for _ in range(2):
        stream = await client.chat.completions.create(model=MODEL, max_tokens=6, stream=True, messages=messages,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    await client.close()
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details.cached_tokens > 0


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items()) if k not in ("max_model_len", "root")}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


async def exchange(http: aiohttp.ClientSession, base: str, model: str) -> dict[str, Any]:
    """Responses of one backend to the same set of requests, reduced to shapes."""
    out: dict[str, Any] = {}
    chat = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    out["chat"] = shape((await post(http, base + "/v1/chat/completions", chat))[1])
    out["completion"] = shape((await post(http, base + "/v1/completions",
                                          {"model": model, "prompt": "hi", "max_tokens": 3}))[1])
    async with http.post(base + "/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 3,
                                                              "ignore_eos": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        events = [e[6:] for e in (await r.read()).decode().split("\n\n") if e.startswith("data: ")]
    out["stream_first"] = shape(json.loads(events[0]))
    out["stream_usage"] = shape(json.loads(events[-2]))
    out["stream_end"] = events[-1]
    async with http.get(base + "/v1/models") as r:
        out["models"] = shape(await r.json())
    async with http.get(base + "/load") as r:
        out["load"] = shape(await r.json())
    errors = {
        "bad_json": (base + "/v1/completions", b"{oops"),
        "unknown_model": (base + "/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode()),
        "bad_field": (base + "/v1/completions", json.dumps({"model": model, "prompt": "x", "max_tokens": -1}).encode()),
    }
    for name, (url, data) in errors.items():
        async with http.post(url, data=data) as r:
            out[name] = (r.status, await r.json())
    async with http.get(base + "/v1/unknown") as r:
        out["unknown_path"] = (r.status, await r.json())
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    out["metrics"] = sorted(n for n in METRIC_NAMES if n in text)
    return out


async def test_sim_and_vllm_backends_answer_with_the_same_shapes(engine_url: str, http: aiohttp.ClientSession) -> None:
    sim = TestServer(create_app(SimBackend(SimConfig(model_name=MODEL, profile="instant"))), host="127.0.0.1")
    await sim.start_server()
    try:
        real = await exchange(http, engine_url, MODEL)
        simulated = await exchange(http, str(sim.make_url("")).rstrip("/"), MODEL)
    finally:
        await sim.close()
    for key in real:
        if key in ("bad_json", "unknown_model", "bad_field", "unknown_path"):
            (rs, rb), (ss, sb) = real[key], simulated[key]
            assert rs == ss, key
            assert rb["error"]["type"] == sb["error"]["type"], key
            assert rb["error"]["param"] == sb["error"]["param"], key
            assert rb == sb or key in ("bad_json",), key  # JSON decoder messages may differ in position
        else:
            assert real[key] == simulated[key], key
    assert real["metrics"] == sorted(METRIC_NAMES)



# Last in the module: it kills the module's engine.
async def test_an_engine_core_killed_by_sigill_makes_the_server_exit_1_naming_the_dtype_flag(engine: Engine) -> None:
    cores = [p for p in psutil.Process(engine.proc.pid).children(recursive=True)
             if p.name().startswith("VLLM::EngineCore")]
    assert cores, [p.name() for p in psutil.Process(engine.proc.pid).children(recursive=True)]
    cores[0].send_signal(signal.SIGILL)  # what a VM that cannot execute AVX512-BF16/AMX does to it
    assert await asyncio.to_thread(engine.proc.wait, 120) == 1  # exits on its own: a supervisor restarts it
    out = engine.output()
    assert "engine failed, exiting with status 1" in out
    assert "killed by SIGILL" in out and "--dtype float32" in out
    print(next(ln for ln in out.splitlines() if "exiting with status 1" in ln))
