"""Live config reload: sim engines and the router in-process, the config in a temp file."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from config.router import load_config
from router.app import ROUTER, create_app
from router.reload import RELOADER, Reloader
from router.runtime import Router
from tests.conftest import SimServerFactory, free_port

SYSTEM = "You are the support assistant of the Acme rocket company. Answer precisely. " * 12


@dataclass
class Fleet:
    """Sim engines, a router, and the router's config file."""

    engines: list[TestServer]
    path: Path
    server: TestServer | None = None

    @property
    def router(self) -> Router:
        assert self.server is not None
        return self.server.app[ROUTER]

    @property
    def reloader(self) -> Reloader:
        assert self.server is not None
        return self.server.app[RELOADER]

    def config(self, replicas: dict[str, int], **extra: Any) -> dict[str, Any]:
        """A config dict: replica name -> engine index, fast probes, ``extra`` on top."""
        return {"replicas": [{"name": n, "url": str(self.engines[i].make_url("")).rstrip("/")}
                             for n, i in replicas.items()],
                "health": {"check_interval_s": 0.2}, "load": {"poll_interval_s": 0.1}, **extra}

    def write(self, replicas: dict[str, int], **extra: Any) -> None:
        tmp = self.path.with_suffix(".tmp")  # atomic replace, as deploy tools do
        tmp.write_text(yaml.safe_dump(self.config(replicas, **extra)))
        tmp.replace(self.path)


Start = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def fleet(sim_server: SimServerFactory, tmp_path: Path) -> AsyncIterator[Start]:
    servers: list[TestServer] = []

    async def start(engines: int = 3, replicas: int = 2, watch_interval_s: float = 3600.0,
                    extra: dict[str, Any] | None = None, **sim: Any) -> Fleet:
        sim.setdefault("profile", "instant")
        f = Fleet([await sim_server(**sim) for _ in range(engines)], tmp_path / "router.yaml")
        f.write({f"r{i}": i for i in range(replicas)}, **(extra or {}))
        app = create_app(load_config(f.path), config_file=f.path)
        app[RELOADER].watch_interval_s = watch_interval_s
        f.server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await f.server.start_server()
        servers.append(f.server)
        return f

    yield start
    for s in servers:
        await s.close()


def chat(user: str, system: str = SYSTEM, **kw: Any) -> dict[str, Any]:
    return {"model": "sim-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}], **kw}


async def post_chat(s: aiohttp.ClientSession, f: Fleet,
                    body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    assert f.server is not None
    async with s.post(f.server.make_url("/v1/chat/completions"), json=body) as r:
        return r.status, await r.json(), r.headers.get("x-router-replica", "")


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_reload_adds_and_removes_replicas(fleet: Start) -> None:
    f = await fleet(engines=3, replicas=2, extra={"policy": {"name": "round_robin"}})
    f.write({"r1": 1, "r2": 2}, policy={"name": "round_robin"})
    result = await f.reloader.reload("api")
    assert result.ok and result.added == ("r2",) and result.removed == ("r0",)
    assert f.router.registry.names() == ["r1", "r2"] and result.generation == 2
    async with aiohttp.ClientSession() as s:
        served = {(await post_chat(s, f, chat(f"q{i}", system=f"{i} " * 40)))[2] for i in range(6)}
    assert served == {"r1", "r2"}


async def test_learned_prefix_index_survives_a_reload(fleet: Start) -> None:
    f = await fleet(engines=3, replicas=2)
    async with aiohttp.ClientSession() as s:
        _, _, first = await post_chat(s, f, chat("warm up"))
        policy = f.router.dispatcher.policy if f.router.dispatcher else None
        assert policy is not None and policy.index_size(first) > 0  # type: ignore[attr-defined]
        f.write({"r0": 0, "r1": 1, "r2": 2}, timeouts={"first_byte_s": 30})
        result = await f.reloader.reload("api")
        assert result.ok and result.added == ("r2",) and not result.policy_replaced
        assert f.router.dispatcher is not None and f.router.dispatcher.policy is policy
        assert f.router.dispatcher.settings.timeouts.first_byte_s == 30
        assert policy.index_size(first) > 0  # type: ignore[attr-defined]
        status, body, again = await post_chat(s, f, chat("same prefix, new question"))
    assert status == 200 and again == first
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_a_policy_change_builds_a_new_policy(fleet: Start) -> None:
    f = await fleet(replicas=2)
    before = f.router.dispatcher.policy if f.router.dispatcher else None
    f.write({"r0": 0, "r1": 1}, policy={"name": "cost", "params": {"work_weight": 0.5}})
    result = await f.reloader.reload("api")
    assert result.ok and result.policy_replaced and result.changed == ("policy",)
    assert f.router.dispatcher is not None and f.router.dispatcher.policy is not before
    assert f.router.dispatcher.policy.work_weight == 0.5  # type: ignore[attr-defined]


async def test_a_bad_file_keeps_the_old_config_and_names_the_field(fleet: Start) -> None:
    f = await fleet(replicas=2)
    before = f.router.config
    config = f.config({"r0": 0, "r1": 1})
    config["replicas"][1]["url"] = "ftp://x"
    f.path.write_text(yaml.safe_dump(config))
    assert f.server is not None
    async with aiohttp.ClientSession() as s:
        async with s.post(f.server.make_url("/admin/reload")) as r:
            assert r.status == 400
            error = (await r.json())["error"]
        async with s.get(f.server.make_url("/metrics")) as r:
            metrics = await r.text()
        status, _, _ = await post_chat(s, f, chat("still serving"))
    assert "replicas.1.url" in error["message"] and error["code"] == "invalid_config"
    assert f.router.config is before and f.reloader.generation == 1 and status == 200
    assert 'router_config_reloads_total{result="error"} 1.0' in metrics
    assert "router_config_generation 1.0" in metrics


async def test_a_bad_policy_param_is_refused_before_anything_changes(fleet: Start) -> None:
    f = await fleet(replicas=2)
    f.write({"r1": 1, "r2": 2}, policy={"name": "cost", "params": {"no_such_knob": 1}})
    result = await f.reloader.reload("api")
    assert not result.ok and result.error is not None and result.error.startswith("policy.params:")
    assert f.router.registry.names() == ["r0", "r1"]


async def test_listen_address_changes_are_reported_as_needing_a_restart(fleet: Start) -> None:
    f = await fleet(replicas=1)
    port = f.router.config.port
    f.write({"r0": 0}, port=port + 1, retry={"max_attempts": 2})
    result = await f.reloader.reload("api")
    assert result.ok and result.needs_restart == ("port",)
    assert f.router.config.port == port and f.router.config.retry.max_attempts == 2


async def test_poll_intervals_change_live(fleet: Start) -> None:
    f = await fleet(replicas=1)
    f.write({"r0": 0}, health={"check_interval_s": 0.5, "check_timeout_s": 0.3}, load={"poll_interval_s": 0.25})
    assert (await f.reloader.reload("api")).ok
    poller = f.router.poller
    assert poller is not None and poller.running
    assert (poller.health_interval_s, poller.load_interval_s, poller.timeout_s) == (0.5, 0.25, 0.3)


async def test_a_file_change_is_picked_up_by_the_watcher(fleet: Start) -> None:
    f = await fleet(replicas=2, watch_interval_s=0.05)
    config = f.config({"r0": 0, "r1": 1})
    config["replicas"][0]["weight"] = 3.0
    f.path.write_text(yaml.safe_dump(config))
    assert await wait_for(lambda: f.reloader.generation == 2)
    assert f.reloader.last is not None and f.reloader.last.trigger == "file"
    assert f.reloader.last.updated == ("r0",)
    replica = f.router.registry.get("r0")
    assert replica is not None and replica.weight == 3.0


async def test_rewriting_the_same_content_is_not_a_change(fleet: Start) -> None:
    f = await fleet(replicas=1)
    assert not f.reloader.file_changed()
    f.path.write_text(f.path.read_text())
    assert not f.reloader.file_changed()
    f.write({"r0": 0}, shutdown_grace_s=1)
    assert f.reloader.file_changed()


async def test_sighup_triggers_a_reload(fleet: Start) -> None:
    f = await fleet(replicas=1)
    if not f.reloader.install_sighup():
        pytest.skip("no SIGHUP handler possible here")
    try:
        f.write({"r0": 0, "r1": 1})
        os.kill(os.getpid(), signal.SIGHUP)
        assert await wait_for(lambda: f.reloader.generation == 2)
    finally:
        f.reloader.remove_sighup()
    assert f.reloader.last is not None and f.reloader.last.trigger == "sighup"
    assert f.router.registry.names() == ["r0", "r1"]


async def test_a_removed_replica_finishes_its_stream(fleet: Start) -> None:
    f = await fleet(engines=2, replicas=1, profile="llmd-8b", time_scale=1.0)
    assert f.server is not None
    async with aiohttp.ClientSession() as s:
        r = await s.post(f.server.make_url("/v1/completions"),
                         json={"model": "sim-model", "prompt": "hello", "max_tokens": 30, "stream": True})
        await r.content.readuntil(b"\n\n")
        f.write({"r1": 1})
        result = await f.reloader.reload("api")
        assert result.ok and result.removed == ("r0",)
        old = result.retired[0]
        assert old.in_flight_requests == 1 and old.health.draining
        async with s.get(f.server.make_url("/admin/replicas")) as listing:
            rows = {(row["name"], row["removed"]): row for row in (await listing.json())["data"]}
        assert rows[("r0", True)]["in_flight_requests"] == 1 and ("r1", False) in rows
        raw = (await r.read()).decode()
        r.close()
    events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1])
    assert old.in_flight_requests == 0
    assert 'replica="r0"' in f.router.metrics.render().decode()
    f.reloader.prune()
    assert f.reloader.retired == []
    assert 'replica="r0"' not in f.router.metrics.render().decode()  # no series left behind



async def test_serve_reloads_on_sighup_and_cli_flags_still_win(sim_server: SimServerFactory,
                                                               tmp_path: Path) -> None:
    from router.cli import build_parser, config_from_args, serve

    engines = [await sim_server() for _ in range(2)]
    urls = [str(e.make_url("")).rstrip("/") for e in engines]
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"replicas": [{"name": "r0", "url": urls[0]}], "port": free_port()}))
    args = build_parser().parse_args(["--config", str(path), "--policy", "round_robin"])
    cfg = config_from_args(args)
    task = asyncio.create_task(serve(cfg, config_file=str(path),
                                     config_source=functools.partial(config_from_args, args)))
    base = f"http://127.0.0.1:{cfg.port}"
    try:  # never signal before serve() has its handlers: SIGHUP's default action ends the process
        assert await wait_for(lambda: task.done() or signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL)
        assert not task.done()
        replicas = [{"name": "r0", "url": urls[0]}, {"name": "r1", "url": urls[1]}]
        path.write_text(yaml.safe_dump({"replicas": replicas, "port": cfg.port, "policy": {"name": "cost"}}))
        os.kill(os.getpid(), signal.SIGHUP)
        async with aiohttp.ClientSession() as s:
            shown: dict[str, Any] = {}
            deadline = time.monotonic() + 30  # a hang guard: met at once unless the host is very busy
            while time.monotonic() < deadline:
                async with s.get(f"{base}/admin/config") as r:
                    shown = await r.json()
                if shown["generation"] == 2:
                    break
                await asyncio.sleep(0.05)
        assert shown["generation"] == 2 and shown["last_change"]["trigger"] in ("sighup", "file")
        assert [r["name"] for r in shown["config"]["replicas"]] == ["r0", "r1"]
        assert shown["config"]["policy"]["name"] == "round_robin"  # the flag, not the file
    finally:
        if not task.done() and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: graceful stop
        else:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    assert task.exception() is None


async def test_no_request_fails_across_five_reloads_under_load(fleet: Start) -> None:
    """8 clients, streamed and not, for ~4 s while the config changes 5 times: a replica with requests in
    flight is removed and added back, the policy is swapped, a replica moves engine, settings change."""
    rr = {"policy": {"name": "round_robin"}}
    f = await fleet(engines=4, replicas=3, extra=rr, profile="llmd-8b", time_scale=1.0)
    assert f.server is not None
    url = f.server.make_url("/v1/chat/completions")
    failures: list[str] = []
    completed = 0
    stop_at = time.monotonic() + 4.0

    async def client(c: int, s: aiohttp.ClientSession) -> None:
        nonlocal completed
        for i in range(80):  # bounded in count as well as in time
            if time.monotonic() > stop_at:
                return
            stream = (c + i) % 2 == 0
            body = chat(f"client {c} question {i}", system=f"tenant {c % 3}. " + SYSTEM, max_tokens=12,
                        stream=stream)
            try:
                async with s.post(url, json=body) as r:
                    raw = (await r.read()).decode()
                    status = r.status
            except aiohttp.ClientError as exc:
                failures.append(f"client {c}: {exc!r}")
                continue
            events = [e[6:] for e in raw.split("\n\n") if e.startswith("data: ")]
            if status != 200:
                failures.append(f"client {c}: {status} {raw[:200]}")
            elif stream and (events[-1:] != ["[DONE]"] or any('"error"' in e for e in events)):
                failures.append(f"client {c}: broken stream {raw[-200:]}")
            elif not stream and not json.loads(raw).get("choices"):
                failures.append(f"client {c}: no choices {raw[:200]}")
            else:
                completed += 1

    async def operator(s: aiohttp.ClientSession) -> tuple[int, list[bool]]:
        everyone, moved = {"r0": 0, "r1": 1, "r2": 2}, {"r0": 0, "r1": 3, "r2": 2}
        r0 = f.router.registry.get("r0")
        assert r0 is not None and await wait_for(lambda: r0.in_flight_requests > 0, 3)
        f.write({"r1": 1, "r2": 2}, **rr)
        busy = r0.in_flight_requests  # no await between this and the swap below
        oks = [(await f.reloader.reload("api")).ok]
        steps: list[tuple[dict[str, int], dict[str, Any]]] = [
            (everyone, rr),  # r0 back
            (everyone, {"policy": {"name": "cost"}}),  # a new policy
            (moved, {"policy": {"name": "cost"}}),  # r1's url changes: drained, re-created
            (moved, {"policy": {"name": "cost"}, "timeouts": {"first_byte_s": 60},
                     "retry": {"max_attempts": 2}}),
        ]
        for replicas, extra in steps:
            await asyncio.sleep(0.4)
            f.write(replicas, **extra)
            async with s.post(f.server.make_url("/admin/reload")) as r:  # type: ignore[union-attr]
                oks.append(r.status == 200 and (await r.json())["ok"])
        return busy, oks

    async with aiohttp.ClientSession() as s:
        clients = [asyncio.create_task(client(c, s)) for c in range(8)]
        await asyncio.sleep(0.3)
        busy, oks = await operator(s)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert failures == []
    assert busy > 0 and oks == [True] * 5 and f.reloader.generation == 6
    assert completed >= 40, completed
    assert sorted(f.router.registry.names()) == ["r0", "r1", "r2"]
    assert all(r.in_flight_requests == 0 for r in f.reloader.retired)
