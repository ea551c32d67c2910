"""The live router follows its replicas' KV events: sim engines publish over ipc://, the router discovers
the endpoints from /load, keeps an exact index per replica, offers each request's exact match to the
policy (`RequestFeatures.kv_match`), exports per-replica metrics, and follows reloads.

Every wait is for a state with a generous hang guard, never for a duration.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config.router import ConfigError, parse_config
from engine_server.app import create_app as create_engine_app
from engine_server.kv_events import KVEventsSettings
from engine_server.sim.backend import SimBackend, SimConfig
from router.app import create_app
from router.reload import apply_config
from router.runtime import ROUTER, Router

HANG_GUARD_S = 30.0
SYSTEM = "You are a careful assistant who answers in plain words. " * 8


async def until(cond: Callable[[], bool]) -> None:
    async def wait() -> None:
        while not cond():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), HANG_GUARD_S)


class Fleet:
    def __init__(self) -> None:
        self.engines: list[SimBackend] = []
        self.servers: list[TestServer] = []
        self.replicas: list[dict[str, str]] = []
        self.router: TestServer | None = None
        self.dirs: list[str] = []

    @property
    def state(self) -> Router:
        assert self.router is not None
        return self.router.app[ROUTER]

    def caught_up(self) -> bool:
        """Every engine's published batches applied, every replica synced."""
        source = self.state.kv_events
        if source is None:
            return False
        for r, engine in zip(self.replicas, self.engines, strict=True):
            sync = source.index.replica(r["name"])
            pub = engine.kv_events
            if sync is None or pub is None or not pub.flush() or sync.status != "synced" \
                    or sync.next_seq != pub.published or sync.replaying_from is not None:
                return False
        return True


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[..., Any]]:
    f = Fleet()

    async def start(n: int = 2, **kv: Any) -> Fleet:
        for i in range(n):
            d = tempfile.mkdtemp(prefix="kvr", dir="/tmp")  # ipc paths must be short
            f.dirs.append(d)
            engine = SimBackend(SimConfig(model_name="sim-model", profile="instant", time_scale=0, block_size=4,
                                          kv_events=KVEventsSettings(endpoint=f"ipc://{d}/pub",
                                                                     replay_endpoint=f"ipc://{d}/replay")))
            server = TestServer(create_engine_app(engine), host="127.0.0.1")
            await server.start_server()
            f.engines.append(engine)
            f.servers.append(server)
            f.replicas.append({"name": f"r{i}", "url": str(server.make_url("")).rstrip("/")})
        cfg = parse_config({"replicas": f.replicas, "policy": {"name": "cost"},
                            "health": {"check_interval_s": 0.2}, "load": {"poll_interval_s": 0.1},
                            "kv_events": {"enabled": True, "tokenizer": "sim", "rediscover_s": 0.1,
                                          "idle_probe_s": 0.05, **kv}})
        f.router = TestServer(create_app(cfg, tracing=None), host="127.0.0.1", handler_cancellation=True)
        await f.router.start_server()
        await until(f.caught_up)
        return f

    yield start
    for s in [f.router, *f.servers]:
        if s is not None:
            await s.close()
    for d in f.dirs:
        shutil.rmtree(d, ignore_errors=True)


async def chat(f: Fleet, messages: list[dict[str, str]]) -> tuple[str, int]:
    """POST through the router; returns (replica that served, cached_tokens it reported)."""
    assert f.router is not None
    body = {"model": "sim-model", "max_tokens": 3, "messages": messages}
    async with aiohttp.ClientSession() as s, s.post(f.router.make_url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
        return r.headers["x-router-replica"], answer["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_the_routers_exact_match_predicts_the_engines_cached_tokens(fleet):
    f = await fleet()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question?"}]
    for turn in range(4):  # repeated and extended chats
        match = f.state.kv_events.for_request({"messages": messages}, "chat")
        predicted = {r["name"]: match.cached_tokens(r["name"]) for r in f.replicas}
        replica, cached = await chat(f, messages)
        assert cached == predicted[replica], (turn, predicted)
        if turn:
            assert cached > 0
        await until(f.caught_up)
        if turn % 2:
            messages = messages + [{"role": "assistant", "content": "an answer"},
                                   {"role": "user", "content": f"question {turn}?"}]


async def test_metrics_show_each_replicas_sync_status_and_blocks(fleet):
    f = await fleet()
    await chat(f, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}])
    await until(f.caught_up)
    async with aiohttp.ClientSession() as s, s.get(f.router.make_url("/metrics")) as r:
        text = await r.text()
    for name in ("r0", "r1"):
        assert f'router_kv_events_status{{replica="{name}",status="synced"}} 1.0' in text
        assert f'router_kv_events_lag_batches{{replica="{name}"}} 0.0' in text
        assert f'router_kv_events_lost_total{{replica="{name}"}} 0.0' in text
    assert any(line.startswith("router_kv_events_blocks{") and not line.endswith(" 0.0")
               for line in text.splitlines())


async def test_a_reload_that_removes_a_replica_stops_following_it(fleet):
    f = await fleet()
    state = f.state
    new = state.config.model_copy(update={"replicas": state.config.replicas[:1]})
    result = await apply_config(state, new)
    assert result.ok and result.removed == ("r1",)
    await until(lambda: state.kv_events.index.names() == ["r0"])


async def test_a_requests_features_carry_its_exact_match_only_when_enabled():
    cfg = parse_config({"replicas": [{"name": "a", "url": "http://127.0.0.1:9"}]})
    assert cfg.kv_events.enabled is False
    assert create_app(cfg, tracing=None)[ROUTER].kv_events is None


@pytest.mark.parametrize("section, field", [
    ({"enabled": True}, "tokenizer"),
    ({"enabled": True, "tokenizer": "sim", "replicas": {"a": {"endpoint": "localhost:1"}}},
     "kv_events.replicas.a.endpoint"),
    ({"enabled": True, "tokenizer": "sim", "replicas": {"a": {"endpoint": "tcp://*:1"}}},
     "kv_events.replicas.a.endpoint"),
    ({"rediscover_s": 0}, "kv_events.rediscover_s"),
])
def test_config_errors_name_the_field(section, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config({"kv_events": section})
