"""The admin API: list, add, drain, remove replicas, show the config; who may call it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer, make_mocked_request

from config.router import parse_config
from router.admin import _admin_guard, is_loopback, redact
from router.app import ROUTER, create_app
from tests.conftest import SimServerFactory

ADMIN_KEY = "sk-admin-test-0123456789"
USER_KEY = "sk-user-test-9876543210"
Start = Callable[..., Awaitable[tuple[TestServer, list[TestServer]]]]


def _url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def fleet(sim_server: SimServerFactory, tmp_path: Path) -> AsyncIterator[Start]:
    routers: list[TestServer] = []

    async def start(engines: int = 2, replicas: int | None = None, policy: str = "cost",
                    router_cfg: dict[str, Any] | None = None, with_file: bool = False
                    ) -> tuple[TestServer, list[TestServer]]:
        es = [await sim_server() for _ in range(engines)]
        data = {"replicas": [{"name": f"r{i}", "url": _url(e)} for i, e in enumerate(es[:replicas])],
                "policy": {"name": policy}, "health": {"check_interval_s": 0.2},
                "load": {"poll_interval_s": 0.1}, **(router_cfg or {})}
        path = tmp_path / "router.yaml"
        if with_file:
            path.write_text(yaml.safe_dump(data))
        server = TestServer(create_app(parse_config(data), config_file=path if with_file else None),
                            host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        routers.append(server)
        return server, es

    yield start
    for r in routers:
        await r.close()


async def req(s: aiohttp.ClientSession, server: TestServer, method: str, path: str,
              **kw: Any) -> tuple[int, dict[str, Any]]:
    async with s.request(method, server.make_url(path), **kw) as r:
        return r.status, await r.json()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(user: str, system: str = "You answer questions about rockets. " * 20) -> dict[str, Any]:
    return {"model": "sim-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


async def test_list_replicas_shows_health_load_usage_and_index(fleet: Start) -> None:
    server, _ = await fleet()
    registry = server.app[ROUTER].registry
    deadline = time.monotonic() + 30  # a hang guard: met at once unless the host is very busy
    while any(r.load is None for r in registry.all()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as s:
        async with s.post(server.make_url("/v1/chat/completions"), json=chat("hi")) as r:
            served = r.headers["x-router-replica"]
        status, body = await req(s, server, "GET", "/admin/replicas")
    assert status == 200 and body["generation"] == 1
    rows = {row["name"]: row for row in body["data"]}
    assert set(rows) == {"r0", "r1"}
    for row in rows.values():
        assert row["health"] == {"state": "healthy", "admitted": True, "draining": False, "ejections": 0,
                                 "last_failure": None}
        assert row["in_flight_requests"] == 0 and row["removed"] is False
        assert row["load"] is not None and row["load"]["age_s"] >= 0 and row["load"]["kv_blocks_total"] > 0
    other = ({"r0", "r1"} - {served}).pop()
    assert rows[served]["index_blocks"] > 0 and rows[other]["index_blocks"] == 0
    assert rows[served]["prompt_tokens_total"] > 0 and rows[served]["cache_hit_rate"] == 0.0


async def test_learned_timing_is_shown_per_replica_and_exported_as_metrics(fleet: Start) -> None:
    server, _ = await fleet(router_cfg={"policy": {"name": "cost", "calibration": {"mode": "online"}}})
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            async with s.post(server.make_url("/v1/chat/completions"), json={**chat(f"q{i}"), "stream": True}) as r:
                await r.read()
        status, body = await req(s, server, "GET", "/admin/replicas")
        async with s.get(server.make_url("/metrics")) as r:
            metrics = await r.text()
    shown = [row["calibration"] for row in body["data"]]
    assert status == 200 and all(c["mode"] == "online" for c in shown)
    assert sum(c["observations"] for c in shown) >= 4  # a TTFT (and a decode) sample per request
    assert all(c["prefill_s_per_token"] > 0 and c["decode_step_s"] > 0 for c in shown)
    assert 'router_cost_constant_seconds{constant="prefill_s_per_token",replica="r' in metrics
    assert "router_calibration_observations{" in metrics


async def test_add_replica_makes_a_new_config_generation(fleet: Start) -> None:
    server, engines = await fleet(engines=3, replicas=2)
    async with aiohttp.ClientSession() as s:
        status, body = await req(s, server, "POST", "/admin/replicas",
                                 json={"name": "r2", "url": _url(engines[2]) + "/", "weight": 2})
        _, shown = await req(s, server, "GET", "/admin/config")
        async with s.get(server.make_url("/metrics")) as r:
            metrics = await r.text()
    assert status == 201 and body["generation"] == 2
    assert body["replica"]["url"] == _url(engines[2]) and body["replica"]["weight"] == 2
    assert [r["name"] for r in shown["config"]["replicas"]] == ["r0", "r1", "r2"]
    assert shown["last_change"]["trigger"] == "admin" and shown["last_change"]["added"] == ["r2"]
    assert server.app[ROUTER].registry.get("r2") is not None
    assert 'router_config_reloads_total{result="ok"} 1.0' in metrics


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"name": "r2", "url": "ftp://nope"}, "url", 400),
    ({"name": "r2", "url": "http://127.0.0.1:1", "weight": 0}, "weight", 400),
    ({"url": "http://127.0.0.1:1"}, "name", 400),
    ({"name": "r0", "url": "http://127.0.0.1:1"}, "name", "replica_exists"),
])
async def test_add_replica_refuses_bad_input(fleet: Start, body: dict[str, Any], param: str,
                                             code: int | str) -> None:
    server, _ = await fleet(replicas=1)
    async with aiohttp.ClientSession() as s:
        status, error = await req(s, server, "POST", "/admin/replicas", json=body)
    assert status == 400
    assert error["error"]["param"] == param and error["error"]["code"] == code
    assert server.app[ROUTER].registry.names() == ["r0"]


async def test_drain_stops_new_requests_and_undrain_resumes(fleet: Start) -> None:
    server, _ = await fleet(policy="round_robin")
    async with aiohttp.ClientSession() as s:
        status, body = await req(s, server, "POST", "/admin/replicas/r0/drain")
        assert status == 200 and body["replica"]["health"]["draining"] is True
        served = set()
        for i in range(4):
            async with s.post(server.make_url("/v1/chat/completions"), json=chat(f"q{i}")) as r:
                served.add(r.headers["x-router-replica"])
        assert served == {"r1"}
        status, body = await req(s, server, "POST", "/admin/replicas/r0/undrain")
        assert status == 200 and body["replica"]["health"]["admitted"] is True
        for i in range(2):
            async with s.post(server.make_url("/v1/chat/completions"), json=chat(f"again {i}")) as r:
                served.add(r.headers["x-router-replica"])
    assert served == {"r0", "r1"}


async def test_remove_replica_and_unknown_names(fleet: Start) -> None:
    server, _ = await fleet()
    async with aiohttp.ClientSession() as s:
        status, body = await req(s, server, "DELETE", "/admin/replicas/r0")
        assert status == 200 and body == {"generation": 2, "removed": "r0", "in_flight_requests": 0}
        status, missing = await req(s, server, "DELETE", "/admin/replicas/r0")
        assert status == 404 and missing["error"]["code"] == "replica_not_found"
        status, last = await req(s, server, "DELETE", "/admin/replicas/r1")  # would leave no replica
        assert status == 400 and "replicas:" in last["error"]["message"]
    assert server.app[ROUTER].registry.names() == ["r1"]


async def test_the_next_file_reload_overrides_admin_changes(fleet: Start) -> None:
    server, engines = await fleet(replicas=1, with_file=True)
    async with aiohttp.ClientSession() as s:
        extra = {"name": "extra", "url": _url(engines[1])}
        status, _ = await req(s, server, "POST", "/admin/replicas", json=extra)
        assert status == 201 and server.app[ROUTER].registry.names() == ["r0", "extra"]
        status, result = await req(s, server, "POST", "/admin/reload")
    assert status == 200 and result["removed"] == ["extra"] and result["generation"] == 3
    assert server.app[ROUTER].registry.names() == ["r0"]


async def test_reload_without_a_config_file_is_refused(fleet: Start) -> None:
    server, _ = await fleet(replicas=1)
    async with aiohttp.ClientSession() as s:
        status, body = await req(s, server, "POST", "/admin/reload")
    assert status == 400 and body["error"]["code"] == "no_config_file"


async def test_config_is_shown_with_secrets_redacted_to_admins_only(fleet: Start) -> None:
    auth = {"admin_keys": [{"name": "ops", "value": ADMIN_KEY}], "api_keys": [{"value": USER_KEY}]}
    server, _ = await fleet(router_cfg={"auth": auth, "policy": {"name": "cost",
                                                                 "params": {"prefill_s_per_token": 3e-5}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/admin/config"), headers=bearer(ADMIN_KEY)) as r:
            assert r.status == 200
            text = await r.text()
        shown = json.loads(text)["config"]
        no_key, _ = await req(s, server, "GET", "/admin/config")
        user, _ = await req(s, server, "GET", "/admin/config", headers=bearer(USER_KEY))
    assert ADMIN_KEY not in text and USER_KEY not in text
    ops = shown["auth"]["admin_keys"][0]
    assert ops["name"] == "ops" and ops["value"] == "***"
    assert shown["policy"]["params"]["prefill_s_per_token"] == 3e-5
    assert (no_key, user) == (401, 403)


def test_redact_replaces_strings_under_secret_names_only() -> None:
    dumped = {"api_keys": ["sk-1", {"name": "team", "value": "sk-2", "env": "TEAM_KEY", "rpm": 5}],
              "hf_token": "hf_x", "prefill_s_per_token": 2e-5, "session_header": "x-session-id",
              "nested": {"client_secret": "s", "password": None, "tokens": ["a"]}}
    assert redact(dumped) == {
        "api_keys": ["***", {"name": "team", "value": "***", "env": "TEAM_KEY", "rpm": 5}],
        "hf_token": "***", "prefill_s_per_token": 2e-5, "session_header": "x-session-id",
        "nested": {"client_secret": "***", "password": None, "tokens": ["***"]}}


@pytest.mark.parametrize(("remote", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("::ffff:10.0.0.5", False), ("", False), (None, False),
])
def test_is_loopback(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


@pytest.mark.parametrize(("admin_keys", "headers", "allowed"), [
    (False, {}, False),  # no admin key configured: remote clients are refused
    (True, bearer(ADMIN_KEY), True),  # with one, the key is what counts
])
def test_remote_admin_needs_an_admin_key(admin_keys: bool, headers: dict[str, str], allowed: bool) -> None:
    auth = {"admin_keys": [{"value": ADMIN_KEY}]} if admin_keys else {}
    app = create_app(parse_config({"replicas": [{"name": "r0", "url": "http://127.0.0.1:1"}], "auth": auth}))
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("10.0.0.5", 40000) if name == "peername" else default)
    request = make_mocked_request("GET", "/admin/replicas", headers=headers, app=app, transport=transport)
    denied = _admin_guard(request)
    assert (denied is None) is allowed
    if denied is not None:
        assert denied.status == 403


async def test_a_text_plain_body_cannot_add_a_replica(fleet: Start) -> None:
    router, _ = await fleet()
    body = '{"name": "evil", "url": "http://203.0.113.9:80"}'  # what a web page can send without CORS
    async with aiohttp.ClientSession() as s:
        status, err = await req(s, router, "POST", "/admin/replicas", data=body,
                                headers={"Content-Type": "text/plain"})
        assert status == 415 and err["error"]["code"] == "unsupported_media_type"
        status, listing = await req(s, router, "GET", "/admin/replicas")
    assert "evil" not in {r["name"] for r in listing["data"]}


@pytest.mark.parametrize(("headers", "status"), [
    ({"Origin": "http://evil.example"}, 403),  # cross-site request from a web page
    ({"Host": "rebound.evil.example:8000"}, 403),  # DNS rebinding: the page's name now points to 127.0.0.1
    ({"Host": "localhost:8000", "Origin": "http://localhost:8000"}, 200),  # same origin, loopback name
    ({"Host": "[::1]:8000"}, 200),
    ({"Host": "ops.internal:8000"}, 200),  # listed in admin.allowed_hosts
    ({"Origin": "https://console.internal"}, 200),  # listed in admin.allowed_origins
])
async def test_admin_checks_host_and_origin_against_browser_attacks(fleet: Start, headers: dict[str, str],
                                                                    status: int) -> None:
    router, _ = await fleet(router_cfg={"admin": {"allowed_hosts": ["ops.internal"],
                                                  "allowed_origins": ["https://console.internal"]}})
    async with aiohttp.ClientSession() as s:
        got, body = await req(s, router, "POST", "/admin/replicas/r0/drain", headers=headers)
    assert got == status, body
