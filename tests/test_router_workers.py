"""`python -m router --workers N`: N processes share one port and are supervised; and two router processes
given the same KV events and load decide alike (the property that makes N processes route as one)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestServer

from engine_server.app import create_app as create_engine_app
from engine_server.sim.backend import SimBackend, SimConfig
from kv_wire import BlockRemoved, BlockStored, KVEventBatch
from router.features.hashing import HashingConfig
from router.features.parse import features_from_body
from router.features.tokenize import SimTokens
from router.kv_events.precise import PreciseIndex
from router.kv_events.prefix_source import PrefixSource
from router.policies.registry import create_policy
from router.replica_view import ReplicaView
from router.workers import counted_argv, worker_argv
from tests.conftest import free_port

HANG_GUARD_S = 60.0


def test_a_worker_gets_the_parents_arguments_without_workers_and_with_reuse_port():
    assert worker_argv(["--port", "8000", "--workers", "4", "--config", "c.yaml"]) == [
        "--port", "8000", "--config", "c.yaml", "--reuse-port"]
    assert worker_argv(["--workers=2", "--reuse-port"]) == ["--reuse-port"]


def test_workers_tell_each_process_how_many_share_the_traffic():
    assert counted_argv(["--port", "8000"], 4, 1) == ["--port", "8000", "--router-processes", "4"]


def test_workers_keep_a_process_count_the_operator_gave():
    assert counted_argv(["--router-processes", "8"], 4, 8) == ["--router-processes", "8"]


def test_a_cost_policy_is_told_the_router_processes_and_others_are_not():
    from config.router import parse_config
    from router.runtime import build_policy

    replicas = [{"name": "a", "url": "http://127.0.0.1:9"}]
    told = build_policy(parse_config({"replicas": replicas, "router_processes": 4}))
    assert told.router_processes == 4
    own = build_policy(parse_config({"replicas": replicas, "router_processes": 4,
                                     "policy": {"name": "cost", "params": {"router_processes": 2}}}))
    assert own.router_processes == 2
    assert build_policy(parse_config({"replicas": replicas, "router_processes": 4,
                                      "policy": {"name": "round_robin"}})) is not None


def test_router_processes_must_be_positive(capsys):
    from router.cli import main

    assert main(["--router-processes", "0", "--replica", "http://127.0.0.1:9"]) == 2
    assert "router_processes" in capsys.readouterr().err


def test_workers_must_be_positive(capsys):
    from router.cli import main

    assert main(["--workers", "0", "--replica", "http://127.0.0.1:9"]) == 2
    assert "--workers" in capsys.readouterr().err


def listening_children(parent: psutil.Process, port: int) -> dict[int, int]:
    """pid -> established connections on ``port``, for the parent's children listening on it."""
    out: dict[int, int] = {}
    for child in parent.children():
        try:
            conns = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            out[child.pid] = sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)
    return out


def restarted(workers: dict[int, int], victim: int) -> bool:
    """Two workers listen and the victim is not one of them, in one look (two looks may straddle its
    death: both listening in the first, the victim gone in the second)."""
    return len(workers) == 2 and victim not in workers


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_two_workers_share_the_port_are_restarted_and_drain_on_sigterm():
    engine = TestServer(create_engine_app(SimBackend(SimConfig(model_name="sim-model", profile="instant"))),
                        host="127.0.0.1")
    await engine.start_server()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "--workers", "2", "--port", str(port), "--replica",
                             str(engine.make_url("")).rstrip("/"), "--model", "sim-model"],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    parent = psutil.Process(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        await until(lambda: len(listening_children(parent, port)) == 2, "two workers listening")
        # Open many connections: the kernel spreads them over both listening sockets (the chance that
        # 64 connections all land on one of two is 2^-63).
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        try:
            await until(lambda: sum(listening_children(parent, port).values()) == 64, "connections accepted")
            assert all(n > 0 for n in listening_children(parent, port).values())
        finally:
            for s in socks:
                s.close()

        async with aiohttp.ClientSession() as http:
            async def served() -> int:
                body = {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(url + "/v1/chat/completions", json=body) as r:
                    return r.status

            for _ in range(20):  # both workers learn the replica's health independently
                status = await served()
                if status == 200:
                    break
                await asyncio.sleep(0.2)
            assert status == 200

            victim = next(iter(listening_children(parent, port)))
            os.kill(victim, signal.SIGKILL)
            await until(lambda: restarted(listening_children(parent, port), victim), "the dead worker restarted")
            children = [c.pid for c in parent.children()]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_GUARD_S) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await engine.close()


# ------------------------------------------------------------------------------ same decisions (pure)

BS = 4
REPLICAS = ["a", "b", "c", "d"]


def chat(prompt: str) -> dict:
    return {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}


def event_stream(seed: int, tokens: SimTokens, prompts: list[str]) -> list[tuple[str, int, KVEventBatch]]:
    """Per replica, batches storing some chats' blocks and evicting some (engine hashes are arbitrary)."""
    rng = random.Random(seed)
    seqs = dict.fromkeys(REPLICAS, 0)
    stored: dict[str, list[list[int]]] = {r: [] for r in REPLICAS}
    out = []
    for _ in range(60):
        r = rng.choice(REPLICAS)
        if stored[r] and rng.random() < 0.25:
            victim = stored[r].pop(rng.randrange(len(stored[r])))
            events = [BlockRemoved(block_hashes=victim[-1:], medium="GPU")]  # a chain's tail is evicted
            if len(victim) > 1:
                stored[r].append(victim[:-1])
        else:
            ids = tokens.prompt_ids(chat(rng.choice(prompts)), "chat") or []
            n = len(ids) // BS
            hashes = [rng.getrandbits(63) for _ in range(n)]
            events = [BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=ids[: n * BS],
                                  block_size=BS, lora_id=None, medium="GPU", lora_name=None)]
            stored[r].append(hashes)
        out.append((r, seqs[r], KVEventBatch(ts=float(len(out)), events=events)))
        seqs[r] += 1
    return out


class RouterProcess:
    """What one router process holds: its own event-fed index, tokenizer and policy."""

    def __init__(self) -> None:
        self.index = PreciseIndex()
        for r in REPLICAS:
            sync = self.index.add_replica(r, BS, "sim-model")
            sync.full_resync()
            sync.on_replay_end(ok=True)
        self.source = PrefixSource(self.index, SimTokens(chars_per_token=1))
        self.policy = create_policy("cost", seed=0)
        for r in REPLICAS:
            self.policy.on_replica_added(r)

    def decide(self, body: dict, views: list[ReplicaView]):
        f = dataclasses.replace(features_from_body(body, "chat", "rid", HashingConfig()),
                                kv_match=self.source.for_request(body, "chat"))
        decision = self.policy.choose(f, views)
        self.policy.on_dispatch(f, decision)
        return decision.replica, f.kv_match.match()


def test_two_router_processes_given_the_same_events_and_load_decide_alike():
    rng = random.Random(7)
    bases = ["".join(rng.choice("abcdefgh") for _ in range(rng.randrange(8, 40))) for _ in range(6)]
    prompts = [b + str(k) for b in bases for k in range(3)]
    tokens = SimTokens(chars_per_token=1)
    one, two = RouterProcess(), RouterProcess()
    for r, seq, batch in event_stream(3, tokens, prompts):
        one.index.replica(r).on_live(seq, batch)
        two.index.replica(r).on_live(seq, batch)
    exact_hits = 0
    for i in range(40):
        views = [ReplicaView(name=r, url=f"http://{r}", running=rng.randrange(4), waiting=rng.randrange(3),
                             kv_blocks_total=64, block_size=BS, load_age_s=0.1) for r in REPLICAS]
        body = chat(rng.choice(prompts) + ("" if i % 2 else " and more"))
        first, second = one.decide(body, views), two.decide(body, views)
        assert first == second, i  # same replica, same exact match per replica
        assert set(first[1]) == set(REPLICAS)
        exact_hits += any(m.blocks > 0 for m in first[1].values())
    assert exact_hits >= 10  # the processes agreed on non-trivial matches, not only on empty ones


@pytest.mark.slow
def test_workers_that_cannot_start_stop_the_parent_with_an_error():
    """A port held by a socket without SO_REUSEPORT: every worker fails at once; no endless crash loop."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "router", "--workers", "2", "--port", str(port), "--replica",
                               "http://127.0.0.1:9", "--model", "m"], capture_output=True, text=True,
                              timeout=HANG_GUARD_S * 2, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 1
    assert "giving up" in proc.stderr


# ------------------------------------------------------------------------------ one view of N workers


def scraped(text: str, family: str, **labels: str) -> float:
    """Sum of the samples of ``family`` (sample name) whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == family and all(s.labels.get(k) == v for k, v in labels.items()))


@dataclasses.dataclass
class View:
    """What one worker's admin API shows."""

    generation: int
    prompt_tokens: float
    draining: set[str]
    replicas: set[str]


class WorkerRouter:
    """`python -m router --workers 2` with a config file, and fresh-connection HTTP to it."""

    def __init__(self, config: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "router", "--workers", "2", "--port", str(self.port),
                                      "--config", config], env={**os.environ, "PYTHONPATH": os.getcwd()})
        self.parent = psutil.Process(self.proc.pid)
        self.sent = 0

    def workers(self) -> dict[int, int]:
        return listening_children(self.parent, self.port)

    async def chat(self) -> int:
        """One request on a new connection (so the kernel picks the worker anew); every one is counted."""
        body = {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            self.sent += 1
            async with http.post(self.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

    async def metrics(self) -> str:
        async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
                    http.get(self.url + "/metrics") as r):
            assert r.status == 200
            return await r.text()

    async def worker_view(self) -> tuple[int, View]:
        """The view of the worker one keep-alive connection lands on, and its pid."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            async with http.get(self.url + "/admin/config") as r:
                config = await r.json()
            async with http.get(self.url + "/admin/replicas") as r:
                replicas = {x["name"]: x for x in (await r.json())["data"] if not x["removed"]}
        return config["worker"]["pid"], View(config["generation"],
                                              sum(x["prompt_tokens_total"] for x in replicas.values()),
                                              {n for n, x in replicas.items() if x["health"]["draining"]},
                                              set(replicas))

    async def views(self) -> dict[int, View]:
        """pid -> view of each live worker (asked until every one answered)."""
        out: dict[int, View] = {}
        deadline = time.monotonic() + HANG_GUARD_S
        while set(out) != set(self.workers()):
            assert time.monotonic() < deadline, "both workers answered"
            pid, view = await self.worker_view()
            out[pid] = view
            out = {p: v for p, v in out.items() if p in self.workers()}
        return out

    async def until_all(self, cond, what: str) -> None:
        """Until every live worker's view satisfies ``cond``."""
        deadline = time.monotonic() + HANG_GUARD_S
        while not all(cond(v) for v in (await self.views()).values()):
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    async def admin(self, method: str, path: str, body: dict | None = None) -> dict:
        async with aiohttp.ClientSession() as http, http.request(method, self.url + path, json=body) as r:
            assert r.status in (200, 201), await r.text()
            return await r.json()

    async def counted(self) -> str:
        """A scrape once every request sent is counted (counted as answered, not before) and no longer
        in flight: the other workers publish their in-flight gauges every `PUBLISH_EVERY_S`, so one
        that published in the middle of a request shows it for up to that long."""
        deadline = time.monotonic() + HANG_GUARD_S
        while (scraped(text := await self.metrics(), "router_requests_total") != self.sent
               or scraped(text, "router_replica_in_flight", replica="sim") != 0):
            assert time.monotonic() < deadline, "requests counted"
            await asyncio.sleep(0.1)
        return text

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(HANG_GUARD_S) == 0


@pytest.mark.slow
async def test_workers_answer_metrics_and_reload_as_one_router(tmp_path):
    """Counts sum over both workers whichever answers, survive a killed worker, and an admin reload or
    replica change on one worker reaches both; the shared metrics directory is gone after the router exits."""
    engine = TestServer(create_engine_app(SimBackend(SimConfig(model_name="sim-model", profile="instant"))),
                        host="127.0.0.1")
    await engine.start_server()
    config = tmp_path / "router.yaml"
    config.write_text(f"replicas:\n  - name: sim\n    url: {str(engine.make_url('')).rstrip('/')}\n"
                      "    models: [sim-model]\n")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "router-metrics-*")))
    router = WorkerRouter(str(config))
    try:
        await until(lambda: len(router.workers()) == 2, "two workers listening")
        while await router.chat() != 200:  # both workers probe the replica's health themselves
            await asyncio.sleep(0.2)
        for _ in range(30):
            await router.chat()
        views = await router.views()  # both workers served some, and each sees only its own
        assert all(v.prompt_tokens > 0 for v in views.values())
        for _ in range(6):  # whichever worker answers the scrape
            text = await router.counted()
            assert scraped(text, "router_prompt_tokens_total") == sum(v.prompt_tokens for v in views.values())
            assert scraped(text, "router_replica_healthy", replica="sim") == 1
            assert scraped(text, "router_replica_in_flight", replica="sim") == 0
            assert "pid=" not in text  # no per-worker series

        victim = next(iter(router.workers()))
        os.kill(victim, signal.SIGKILL)
        await until(lambda: restarted(router.workers(), victim), "worker restarted")
        for _ in range(6):  # the dead worker's counts stay, counted once
            await router.counted()
        while await router.chat() != 200:  # the new worker's first requests may find no healthy replica yet
            await asyncio.sleep(0.2)
        await router.counted()

        assert (await router.admin("POST", "/admin/reload"))["other_workers"] == "applying"
        await router.until_all(lambda v: v.generation == 2, "both workers reloaded")  # from 1, once each
        assert scraped(await router.metrics(), "router_config_reloads_total", result="ok") == 2

        # fleet changes through the admin API reach both workers too
        await router.admin("POST", "/admin/replicas/sim/drain")
        await router.until_all(lambda v: v.draining == {"sim"}, "both workers drain")
        await router.admin("POST", "/admin/replicas/sim/undrain")
        await router.until_all(lambda v: not v.draining, "both workers undrain")
        extra = {"name": "extra", "url": "http://127.0.0.1:9", "models": ["sim-model"]}
        await router.admin("POST", "/admin/replicas", extra)
        await router.until_all(lambda v: v.replicas == {"sim", "extra"}, "both workers add")
        await router.admin("DELETE", "/admin/replicas/extra")
        await router.until_all(lambda v: v.replicas == {"sim"}, "both workers remove")
        assert scraped(await router.metrics(), "router_config_reloads_total", result="error") == 0
        router.stop()
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "router-metrics-*"))) == before
    finally:
        if router.proc.poll() is None:
            router.proc.kill()
            router.proc.wait()
        await engine.close()


@pytest.mark.slow
def test_workers_whose_parent_was_killed_drain_and_exit():
    """No orphan keeps the port unsupervised (a new router on the port would share it with them)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router", "--workers", "2", "--port", str(port), "--replica",
                             "http://127.0.0.1:9", "--model", "m"], env={**os.environ, "PYTHONPATH": os.getcwd()})
    parent = psutil.Process(proc.pid)
    orphans: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while len(workers := listening_children(parent, port)) < 2:
            assert time.monotonic() < deadline, "two workers listening"
            time.sleep(0.1)
        orphans = [psutil.Process(pid) for pid in workers]
        left_behind = orphans[0].environ()["PROMETHEUS_MULTIPROC_DIR"]  # a killed parent cannot remove it
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(orphans, timeout=HANG_GUARD_S)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for orphan in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()
        if orphans:
            shutil.rmtree(left_behind, ignore_errors=True)
