"""API keys: bearer check, 401/403 in OpenAI format, admin paths, keys from env/file, no key in logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config.router import ConfigError, parse_config
from router.app import ROUTER
from router.auth import KeyTable, bearer_token, check_admin
from tests.conftest import SimServerFactory
from tests.router.access_fixtures import ADMIN_KEY, USER_KEY, StartRouter, bearer, post, router_factory

AUTH = {"auth": {"api_keys": [{"name": "team-a", "value": USER_KEY}],
                 "admin_keys": [{"name": "ops", "value": ADMIN_KEY}]}}


@pytest.fixture
async def start_router(sim_server: SimServerFactory) -> AsyncIterator[StartRouter]:
    async with router_factory(sim_server) as start:
        yield start


def add_test_routes(app: web.Application) -> None:
    """A stand-in admin route (under /admin, guarded by the middleware) and one elsewhere using check_admin."""

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def guarded(request: web.Request) -> web.Response:
        return check_admin(request) or web.json_response({"ok": True})

    app.router.add_get("/admin/_test_ping", ok)
    app.router.add_get("/ops/_test_guarded", guarded)



async def test_the_right_key_is_accepted(start_router: StartRouter) -> None:
    router = await start_router(AUTH)
    async with aiohttp.ClientSession() as s:
        r = await post(s, router, USER_KEY)
    assert r.status == 200


@pytest.mark.parametrize("header", [None, "Bearer sk-wrong", f"Basic {USER_KEY}", "Bearer ", f"{USER_KEY}"])
async def test_a_wrong_or_missing_key_gets_401_in_openai_format(start_router: StartRouter,
                                                                 header: str | None) -> None:
    router = await start_router(AUTH)
    async with aiohttp.ClientSession() as s, s.post(
            router.make_url("/v1/chat/completions"), json={"model": "sim-model", "messages": []},
            headers={"Authorization": header} if header is not None else {}) as r:
        body = await r.json()
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "sk-" not in body["error"]["message"]


async def test_unknown_paths_need_a_key_too(start_router: StartRouter) -> None:
    router = await start_router(AUTH)
    async with aiohttp.ClientSession() as s:
        async with s.get(router.make_url("/v2/anything")) as r:
            assert r.status == 401
        async with s.get(router.make_url("/v2/anything"), headers=bearer(USER_KEY)) as r:
            assert r.status == 404


async def test_health_and_metrics_need_no_key(start_router: StartRouter) -> None:
    router = await start_router(AUTH)
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/metrics"):
            async with s.get(router.make_url(path)) as r:
                assert r.status in (200, 503), path  # 503 = no replica healthy yet, still not a 401


async def test_without_keys_auth_is_off(start_router: StartRouter) -> None:
    router = await start_router(routes=add_test_routes)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, router)).status == 200
        async with s.get(router.make_url("/admin/_test_ping")) as r:
            assert r.status == 200


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("sk-wrong", 401), (USER_KEY, 403), (ADMIN_KEY, 200)])
async def test_admin_paths_need_an_admin_key(start_router: StartRouter, key: str | None, status: int) -> None:
    router = await start_router(AUTH, routes=add_test_routes)
    async with aiohttp.ClientSession() as s, s.get(router.make_url("/admin/_test_ping"),
                                                   headers=bearer(key) if key else {}) as r:
        body = await r.json()
    assert r.status == status
    if status == 403:
        assert body["error"]["type"] == "permission_error"


@pytest.mark.parametrize(("key", "status"), [(USER_KEY, 403), (ADMIN_KEY, 200)])
async def test_check_admin_guards_a_handler_outside_admin(start_router: StartRouter, key: str,
                                                          status: int) -> None:
    router = await start_router(AUTH, routes=add_test_routes)
    async with aiohttp.ClientSession() as s, s.get(router.make_url("/ops/_test_guarded"),
                                                   headers=bearer(key)) as r:
        assert r.status == status


async def test_an_admin_key_also_serves_the_openai_routes(start_router: StartRouter) -> None:
    router = await start_router(AUTH)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, router, ADMIN_KEY)).status == 200


async def test_keys_follow_a_config_swap(start_router: StartRouter) -> None:
    router = await start_router(AUTH)
    state = router.app[ROUTER]
    state.config = state.config.model_copy(update={"auth": parse_config(
        {"auth": {"api_keys": [{"name": "rotated", "value": "sk-new-key-42"}]}}).auth})
    async with aiohttp.ClientSession() as s:
        assert (await post(s, router, USER_KEY)).status == 401
        assert (await post(s, router, "sk-new-key-42")).status == 200


def test_a_key_can_come_from_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ROUTER_KEY", "  sk-from-env\n")
    table = KeyTable.from_config(parse_config({"auth": {"api_keys": [{"name": "e", "env": "TEST_ROUTER_KEY"}]}}))
    caller = table.lookup("sk-from-env")
    assert caller is not None and caller.name == "e" and not caller.admin


def test_a_key_can_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("sk-from-file\n")
    table = KeyTable.from_config(parse_config({"auth": {"admin_keys": [{"file": str(tmp_path / "admin.key")}]}}))
    caller = table.lookup("sk-from-file")
    assert caller is not None and caller.name == "admin_keys.0" and caller.admin


@pytest.mark.parametrize(("auth", "field", "why"), [
    ({"api_keys": [{"env": "TEST_ROUTER_UNSET_VAR"}]}, "auth.api_keys.0.env", "not set"),
    ({"admin_keys": [{"file": "/nonexistent/router.key"}]}, "auth.admin_keys.0.file", "cannot read"),
    ({"api_keys": [{"file": "EMPTY"}]}, "auth.api_keys.0.file", "empty"),
    ({"api_keys": [{"value": "sk with space"}]}, "auth.api_keys.0.value", "printable ASCII"),
    ({"api_keys": [{"value": "sk-a", "env": "TEST_ROUTER_SET_VAR"}]}, "auth.api_keys.0", "exactly one of"),
    ({"api_keys": [{"name": "x", "value": "sk-a"}, {"name": "x", "value": "sk-b"}]}, "auth", "used twice"),
    ({"api_keys": [{"value": "sk-same"}], "admin_keys": [{"value": "sk-same"}]}, "auth", "same key"),
])
def test_a_bad_key_entry_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth: dict[str, Any],
                                         field: str, why: str) -> None:
    monkeypatch.setenv("TEST_ROUTER_SET_VAR", "sk-set")
    monkeypatch.delenv("TEST_ROUTER_UNSET_VAR", raising=False)
    (tmp_path / "empty.key").write_text("\n")
    for spec in auth.get("api_keys", []):
        if spec.get("file") == "EMPTY":
            spec["file"] = str(tmp_path / "empty.key")
    with pytest.raises(ConfigError) as exc:
        parse_config({"auth": auth})
    assert str(exc.value).startswith(f"{field}:") and why in str(exc.value)
    assert "sk-" not in str(exc.value)


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer   sk-1 ") == "sk-1"
    assert bearer_token("Basic sk-1") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


async def test_refusals_are_counted_by_reason_without_key_material(start_router: StartRouter) -> None:
    router = await start_router(AUTH, routes=add_test_routes)
    async with aiohttp.ClientSession() as s:
        await post(s, router, "sk-wrong")
        await post(s, router)
        async with s.get(router.make_url("/admin/_test_ping"), headers=bearer(USER_KEY)):
            pass
        async with s.get(router.make_url("/metrics")) as r:
            text = await r.text()
    assert 'router_rejected_requests_total{key="",reason="invalid_key"} 1.0' in text
    assert 'router_rejected_requests_total{key="",reason="missing_key"} 1.0' in text
    assert 'router_rejected_requests_total{key="team-a",reason="forbidden"} 1.0' in text
    assert USER_KEY not in text and "sk-wrong" not in text


async def test_no_key_material_reaches_the_logs(start_router: StartRouter, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_ROUTER_ENV_KEY", "sk-env-secret-777")
    cfg = {"auth": {"api_keys": [{"name": "team-a", "value": USER_KEY}, {"env": "TEST_ROUTER_ENV_KEY"}],
                    "admin_keys": [{"name": "ops", "value": ADMIN_KEY}]},
           "limits": {"default_key_limits": {"requests_per_s": 1, "burst": 1}}}
    router = await start_router(cfg, routes=add_test_routes)
    logging.getLogger("test").info("config: %r", router.app[ROUTER].config)
    async with aiohttp.ClientSession() as s:
        for key in (USER_KEY, USER_KEY, "sk-wrong-guess", "sk-env-secret-777", ADMIN_KEY, None):
            await post(s, router, key)
        async with s.get(router.make_url("/admin/_test_ping"), headers=bearer(USER_KEY)):
            pass
    assert "refused" in caplog.text  # the refusals were logged ...
    for secret in (USER_KEY, ADMIN_KEY, "sk-wrong-guess", "sk-env-secret-777"):
        assert secret not in caplog.text  # ... without the keys
