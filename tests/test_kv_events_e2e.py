"""KV events over real ZMQ sockets: a sim engine publishes, the router's hub follows it exactly.

Endpoints are ipc:// files in a fresh temporary directory (no fixed ports). Every wait is for a state,
with a generous hang guard, never for a duration.
"""

from __future__ import annotations

import asyncio
import functools
import random
import shutil
import tempfile
import time
from collections.abc import Iterator

import aiohttp
import pytest

import engine_server.sim.backend as sim_backend_module
from engine_server.app import STATE
from engine_server.backend import GenerationRequest, SamplingOptions
from engine_server.kv_events import KVEventPublisher, KVEventsSettings
from engine_server.sim.backend import SimBackend, SimConfig
from engine_server.sim.kv_cache import block_hashes as sim_block_hashes
from kv_wire import KVEventBatch
from router.features.hashing import token_block_hashes
from router.kv_events.subscriber import EventSource, KVEventHub

BS = 4
MODEL = "sim-model"
HANG_GUARD_S = 30.0


@pytest.fixture
def ipc_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="kve", dir="/tmp")  # short: ipc paths are limited to ~100 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def settings_in(d: str) -> KVEventsSettings:
    return KVEventsSettings(endpoint=f"ipc://{d}/pub", replay_endpoint=f"ipc://{d}/replay")


def source_for(s: KVEventsSettings) -> EventSource:
    return EventSource(replica="e0", endpoint=s.endpoint, replay_endpoint=s.replay_endpoint,
                       block_size=BS, model=MODEL)


async def start_engine(s: KVEventsSettings, num_blocks: int = 24) -> SimBackend:
    backend = SimBackend(SimConfig(model_name=MODEL, profile="instant", time_scale=0, num_blocks=num_blocks,
                                   block_size=BS, chars_per_token=1, kv_events=s))
    await backend.start()
    return backend


async def run_workload(backend: SimBackend, seed: int, n: int) -> list[str]:
    """Shared-prefix prompts, a few at a time; returns the prompts."""
    rng = random.Random(seed)
    prefixes = ["".join(rng.choice("abcdef") for _ in range(rng.randrange(4, 20))) for _ in range(3)]
    prompts = [rng.choice(prefixes) + "".join(rng.choice("xyz") for _ in range(rng.randrange(1, 12)))
               for _ in range(n)]

    async def one(i: int, prompt: str) -> None:
        req = GenerationRequest(f"s{seed}-{i}", prompt, SamplingOptions(max_tokens=rng.randrange(1, 6)))
        async for _ in backend.generate(req):
            pass

    for i in range(0, n, 3):
        await asyncio.gather(*(one(i + j, p) for j, p in enumerate(prompts[i : i + 3])))
    return prompts


async def caught_up(hub: KVEventHub, backend: SimBackend, status: str = "synced") -> None:
    """Wait until the hub applied every batch the engine published and reached `status`."""
    publisher = backend.kv_events
    assert publisher is not None and publisher.flush()
    sync = hub.index.replica("e0")
    assert sync is not None

    async def done() -> None:
        while not (sync.next_seq == publisher.published and sync.status == status
                   and sync.replaying_from is None):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(done(), HANG_GUARD_S)


async def live_ready(hub: KVEventHub, backend: SimBackend, status: str = "synced") -> None:
    """Wait until the subscription receives live messages and is caught up in `status` (publishing empty
    batches as probes: a message sent before the subscription is up is lost, and without a replay
    endpoint only a later message shows where the stream is)."""
    publisher, sync = backend.kv_events, hub.index.replica("e0")

    def ready() -> bool:
        return (sync.stats.live > 0 and sync.status == status and sync.replaying_from is None
                and sync.next_seq == publisher.published)

    async def done() -> None:
        while not ready():
            publisher.publish(KVEventBatch(ts=time.time(), events=[]))
            publisher.flush()
            for _ in range(20):
                await asyncio.sleep(0.01)
                if ready():
                    return

    await asyncio.wait_for(done(), HANG_GUARD_S)


def assert_same_as_engine(hub: KVEventHub, backend: SimBackend, prompts: list[str]) -> None:
    sync = hub.index.replica("e0")
    kv = backend.scheduler.kv
    assert len(sync.index) == kv.num_cached_blocks
    assert all(kv.is_cached(h) for h in sync.index.engine_hashes())
    for prompt in prompts:
        ids = backend.encode(prompt)
        engine = len(kv.lookup(sim_block_hashes(ids, BS), len(ids) + 1))
        assert hub.index.match(token_block_hashes(ids, BS, MODEL))["e0"].blocks == engine


async def test_the_hub_follows_a_sim_engine_exactly(ipc_dir):
    s = settings_in(ipc_dir)
    backend = await start_engine(s)
    try:
        async with KVEventHub(idle_probe_s=0.05) as hub:
            hub.add(source_for(s))
            await live_ready(hub, backend)
            prompts = await run_workload(backend, seed=1, n=18)
            await caught_up(hub, backend)
            assert backend.scheduler.kv.stats.evictions > 0  # the cache was small enough to evict
            assert_same_as_engine(hub, backend, prompts)
            assert hub.subscribers["e0"].decode_errors == 0
            snap = hub.index.snapshot()["e0"]
            assert snap["status"] == "synced" and snap["blocks"] == backend.scheduler.kv.num_cached_blocks
            assert snap["index"]["removed"] > 0 and snap["sync"]["lost"] == 0
    finally:
        await backend.stop()


async def test_a_router_started_late_catches_up_by_replay(ipc_dir):
    s = settings_in(ipc_dir)
    backend = await start_engine(s)
    try:
        prompts = await run_workload(backend, seed=2, n=9)
        async with KVEventHub(idle_probe_s=0.05) as hub:
            hub.add(source_for(s))
            await caught_up(hub, backend)
            assert_same_as_engine(hub, backend, prompts)
    finally:
        await backend.stop()


async def test_a_dropped_batch_is_detected_and_repaired(ipc_dir, monkeypatch):
    dropped: set[int] = set()
    monkeypatch.setattr(sim_backend_module, "KVEventPublisher",
                        functools.partial(KVEventPublisher, drop_seq=dropped.__contains__))
    s = settings_in(ipc_dir)
    backend = await start_engine(s)
    try:
        async with KVEventHub(idle_probe_s=0.05) as hub:
            sync = hub.add(source_for(s))
            await live_ready(hub, backend)
            p0 = backend.kv_events.published
            dropped.update({p0 + 2, p0 + 3, p0 + 8})  # lost live, kept for replay
            prompts = await run_workload(backend, seed=3, n=18)
            await caught_up(hub, backend)
            assert backend.kv_events.published > max(dropped) + 1
            assert sync.stats.gaps >= 1 and sync.stats.lost == 0
            assert_same_as_engine(hub, backend, prompts)
    finally:
        await backend.stop()


async def test_an_engine_restart_resyncs_the_index(ipc_dir):
    s = settings_in(ipc_dir)
    backend = await start_engine(s)
    try:
        async with KVEventHub(idle_probe_s=0.05) as hub:
            sync = hub.add(source_for(s))
            await live_ready(hub, backend)
            await run_workload(backend, seed=4, n=9)
            await caught_up(hub, backend)
            assert len(sync.index) > 0
            resyncs = sync.stats.resyncs
            await backend.stop()
            backend = await start_engine(s)  # same endpoints, empty cache, sequence from 0
            prompts = await run_workload(backend, seed=5, n=6)

            async def resynced() -> None:
                while sync.stats.resyncs == resyncs:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(resynced(), HANG_GUARD_S)
            await caught_up(hub, backend)
            assert_same_as_engine(hub, backend, prompts)
    finally:
        await backend.stop()


async def test_load_advertises_the_event_endpoints_and_block_size(ipc_dir, sim_server):
    s = settings_in(ipc_dir)
    server = await sim_server(kv_events=s, block_size=BS)
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/load")) as resp:
        load = await resp.json()
    assert load["kv_events"] == {"publisher": "zmq", "endpoint": s.endpoint,
                                 "replay_endpoint": s.replay_endpoint, "topic": ""}
    src = EventSource.from_load("e0", str(server.make_url("/")), load)
    assert src == EventSource(replica="e0", endpoint=s.endpoint, replay_endpoint=s.replay_endpoint,
                              block_size=BS, model="sim-model")


def test_a_bind_wildcard_is_advertised_as_the_replica_host():
    load = {"block_size": 16, "model": "m",
            "kv_events": {"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": "t"}}
    src = EventSource.from_load("r", "http://10.0.0.7:8001", load)
    assert (src.endpoint, src.replay_endpoint, src.topic) == ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", "t")
    assert EventSource.from_load("r", "http://h:1", {"block_size": 16}) is None


async def test_the_index_predicts_the_engines_cached_tokens_over_http(ipc_dir, sim_server):
    """Discovered from /load, fed by events: the predicted hit is the `cached_tokens` the engine reports."""
    s = settings_in(ipc_dir)
    server = await sim_server(kv_events=s, block_size=BS, num_blocks=24, chars_per_token=1)
    base = str(server.make_url("/"))
    rng = random.Random(7)
    async with aiohttp.ClientSession() as http, KVEventHub(idle_probe_s=0.05) as hub:
        async with http.get(server.make_url("/load")) as resp:
            hub.add(EventSource.from_load("e0", base, await resp.json()))
        backend = server.app[STATE].backend
        system = "you are a helpful bot. "
        hits = 0
        for i in range(16):
            prompt = system + rng.choice(["tell me ", "say "]) + "".join(rng.choice("xyz")
                                                                       for _ in range(rng.randrange(0, 40)))
            async with http.post(server.make_url("/tokenize"), json={"model": MODEL, "prompt": prompt}) as resp:
                ids = (await resp.json())["tokens"]

            await caught_up(hub, backend)  # what a live router cannot wait for: phase 2 handles the lag
            blocks = hub.index.match(token_block_hashes(ids, BS, MODEL))["e0"].blocks
            predicted = min(blocks, (len(ids) - 1) // BS) * BS
            async with http.post(server.make_url("/v1/completions"),
                                 json={"model": MODEL, "prompt": prompt, "max_tokens": 3}) as resp:
                usage = (await resp.json())["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == predicted, (i, prompt)
            hits += predicted > 0
        assert hits >= 6 and backend.scheduler.kv.stats.evictions > 0


async def test_without_a_replay_endpoint_the_index_is_a_partial_subset(ipc_dir):
    """No replay: the start-up cannot know what came before, so the index is `partial` (never too much)."""
    s = KVEventsSettings(endpoint=f"ipc://{ipc_dir}/pub")
    backend = await start_engine(s)
    try:
        async with KVEventHub(idle_probe_s=0.05) as hub:
            sync = hub.add(source_for(s))
            await live_ready(hub, backend, status="partial")
            prompts = await run_workload(backend, seed=6, n=12)
            await caught_up(hub, backend, status="partial")
            kv = backend.scheduler.kv
            assert all(kv.is_cached(h) for h in sync.index.engine_hashes())
            for prompt in prompts:
                ids = backend.encode(prompt)
                engine = len(kv.lookup(sim_block_hashes(ids, BS), len(ids) + 1))
                assert hub.index.match(token_block_hashes(ids, BS, MODEL))["e0"].blocks <= engine
    finally:
        await backend.stop()


async def test_a_router_started_before_its_engine_syncs_when_the_engine_comes_up(ipc_dir):
    s = settings_in(ipc_dir)
    async with KVEventHub(idle_probe_s=0.05) as hub:
        sync = hub.add(source_for(s))
        assert sync.status == "unsynced"
        backend = await start_engine(s)
        try:
            await live_ready(hub, backend)
            prompts = await run_workload(backend, seed=8, n=9)
            await caught_up(hub, backend)
            assert_same_as_engine(hub, backend, prompts)
        finally:
            await backend.stop()
