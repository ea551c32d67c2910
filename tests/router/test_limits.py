"""Admission limits: token bucket and limiter on a fake clock, then 429/503 through a running router."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config.router import ConfigError, KeyLimits, LimitsConfig, parse_config
from router.limits import LIMITER, Caller, Limiter, Permit, Rejection, TokenBucket, effective_limits
from tests.conftest import SimServerFactory
from tests.router.access_fixtures import USER_KEY, StartRouter, completion, post, router_factory

SLOW = {"profile": "llmd-8b", "time_scale": 1.0}  # ~12 ms a token: streams last as long as max_tokens says


@pytest.fixture
async def start_router(sim_server: SimServerFactory) -> AsyncIterator[StartRouter]:
    async with router_factory(sim_server) as start:
        yield start


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def caller(**limits: Any) -> Caller:
    return Caller(name="k", admin=False, limits=KeyLimits(**limits))


def keyed(**limits: Any) -> dict[str, Any]:
    return {"auth": {"api_keys": [{"name": "k", "value": USER_KEY, **limits}]}}


async def wait_until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert cond()


# -- pure: bucket and limiter -------------------------------------------------------------------------

def test_bucket_allows_a_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0


def test_bucket_never_holds_more_than_burst() -> None:
    bucket = TokenBucket.full(rate=10.0, burst=2.0, now=0.0)
    bucket.take(0.0)
    assert [bucket.take(3600.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_reconfigured_bucket_keeps_its_tokens_capped_by_the_new_burst() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=10.0, now=0.0)
    bucket.reconfigure(rate=1.0, burst=2.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)][2] > 0


def test_rate_limit_refuses_with_retry_after_then_recovers() -> None:
    clock = FakeClock()
    limiter, cfg, c = Limiter(clock), LimitsConfig(), caller(requests_per_s=0.25, burst=1)
    assert isinstance(limiter.admit(c, cfg), Permit)
    refused = limiter.admit(c, cfg)
    assert isinstance(refused, Rejection)
    assert (refused.status, refused.reason, refused.retry_after_s) == (429, "rate_limited", 4)
    clock.now += 4
    assert isinstance(limiter.admit(c, cfg), Permit)


def test_retry_after_is_a_whole_second_at_least() -> None:
    limiter, c = Limiter(FakeClock()), caller(requests_per_s=100.0, burst=1)
    limiter.admit(c, LimitsConfig())
    refused = limiter.admit(c, LimitsConfig())
    assert isinstance(refused, Rejection) and refused.retry_after_s == 1
    assert refused.response().headers["Retry-After"] == "1"


def test_concurrency_counts_permits_until_released() -> None:
    limiter, cfg, c = Limiter(FakeClock()), LimitsConfig(), caller(max_concurrent=2)
    first, second = limiter.admit(c, cfg), limiter.admit(c, cfg)
    refused = limiter.admit(c, cfg)
    assert isinstance(refused, Rejection) and (refused.status, refused.reason) == (429, "concurrency")
    assert isinstance(first, Permit) and isinstance(second, Permit)
    first.release()
    first.release()  # idempotent: a double release must not free a slot it does not hold
    assert limiter.key_in_flight("k") == 1
    assert isinstance(limiter.admit(c, cfg), Permit)


def test_a_concurrency_refusal_burns_no_rate_token() -> None:
    limiter, cfg, c = Limiter(FakeClock()), LimitsConfig(), caller(requests_per_s=1, burst=2, max_concurrent=1)
    held = limiter.admit(c, cfg)
    assert isinstance(held, Permit)
    assert isinstance(limiter.admit(c, cfg), Rejection)
    held.release()
    assert isinstance(limiter.admit(c, cfg), Permit)  # the second token is still there


def test_global_bound_answers_503_and_takes_no_slot() -> None:
    limiter, cfg = Limiter(FakeClock()), LimitsConfig(max_in_flight=2, retry_after_s=3)
    permits = [limiter.admit(None, cfg) for _ in range(2)]
    refusals = [limiter.admit(caller(), cfg) for _ in range(100)]
    assert all(isinstance(r, Rejection) and (r.status, r.reason, r.retry_after_s) == (503, "overloaded", 3)
               for r in refusals)
    assert limiter.in_flight == 2 and limiter.key_in_flight("k") == 0
    assert isinstance(permits[0], Permit)
    permits[0].release()
    assert isinstance(limiter.admit(None, cfg), Permit)


def test_a_keys_own_rate_overrides_the_default_as_a_pair() -> None:
    defaults = KeyLimits(requests_per_s=1, burst=5, max_concurrent=4)
    assert effective_limits(KeyLimits(requests_per_s=100), defaults) == KeyLimits(
        requests_per_s=100, burst=100, max_concurrent=4)
    assert effective_limits(KeyLimits(max_concurrent=1), defaults) == KeyLimits(
        requests_per_s=1, burst=5, max_concurrent=1)


def test_retain_forgets_idle_removed_keys_but_not_busy_ones() -> None:
    limiter, cfg = Limiter(FakeClock()), LimitsConfig()
    busy = Caller(name="busy", admin=False, limits=KeyLimits(max_concurrent=1))
    limiter.admit(busy, cfg)
    idle = limiter.admit(Caller(name="idle", admin=False, limits=KeyLimits()), cfg)
    assert isinstance(idle, Permit)
    idle.release()
    limiter.retain(set())
    assert limiter.key_counts() == {"busy": 1}


@pytest.mark.parametrize(("data", "field"), [
    ({"auth": {"api_keys": [{"value": "sk-a", "requests_per_s": -1}]}}, "auth.api_keys.0.requests_per_s"),
    ({"auth": {"api_keys": [{"value": "sk-a", "max_concurrent": 0}]}}, "auth.api_keys.0.max_concurrent"),
    ({"auth": {"api_keys": [{"value": "sk-a", "burst": 3}]}}, "auth.api_keys.0"),
    ({"limits": {"max_in_flight": 0}}, "limits.max_in_flight"),
    ({"limits": {"default_key_limits": {"requests_per_s": 0}}}, "limits.default_key_limits.requests_per_s"),
])
def test_a_bad_limit_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert str(exc.value).startswith(f"{field}:")


# -- through a running router -------------------------------------------------------------------------

async def test_rate_limit_answers_429_with_retry_after_then_recovers(start_router: StartRouter) -> None:
    router = await start_router(keyed(requests_per_s=20, burst=1))
    now = [1000.0]  # the limiter's clock, so a slow host cannot refill the bucket between two requests
    router.app[LIMITER].clock = lambda: now[0]
    async with aiohttp.ClientSession() as s:
        assert (await post(s, router, USER_KEY)).status == 200
        refused = await post(s, router, USER_KEY)
        assert refused.status == 429 and refused.headers["Retry-After"] == "1"
        body = await refused.json()
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
        now[0] += 0.06  # one token at 20/s
        assert (await post(s, router, USER_KEY)).status == 200


async def test_a_stream_holds_its_concurrency_slot_until_it_ends(start_router: StartRouter) -> None:
    router = await start_router(keyed(max_concurrent=1), **SLOW)
    limiter = router.app[LIMITER]
    async with aiohttp.ClientSession() as s:
        async with s.post(router.make_url("/v1/completions"), json=completion(max_tokens=20, stream=True),
                          headers={"Authorization": f"Bearer {USER_KEY}"}) as stream:
            await stream.content.readuntil(b"\n\n")
            refused = await post(s, router, USER_KEY)
            assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
            assert (await stream.read()).rstrip().endswith(b"[DONE]")
        await wait_until(lambda: limiter.key_in_flight("k") == 0)
        assert (await post(s, router, USER_KEY)).status == 200


async def test_a_client_disconnect_releases_the_slot(start_router: StartRouter) -> None:
    router = await start_router(keyed(max_concurrent=1), **SLOW)
    limiter = router.app[LIMITER]
    async with aiohttp.ClientSession() as s:
        stream = await s.post(router.make_url("/v1/completions"), json=completion(max_tokens=2000, stream=True),
                              headers={"Authorization": f"Bearer {USER_KEY}"})
        await stream.content.readuntil(b"\n\n")
        assert limiter.key_in_flight("k") == 1
        stream.close()
        await wait_until(lambda: limiter.key_in_flight("k") == 0 and limiter.in_flight == 0)
        assert (await post(s, router, USER_KEY)).status == 200


async def test_a_handler_error_releases_the_slot(start_router: StartRouter) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    router = await start_router(keyed(max_concurrent=1),
                                routes=lambda app: app.router.add_get("/v1/_test_boom", boom))
    async with aiohttp.ClientSession() as s:
        async with s.get(router.make_url("/v1/_test_boom"), headers={"Authorization": f"Bearer {USER_KEY}"}) as r:
            assert r.status == 500
        assert router.app[LIMITER].key_in_flight("k") == 0
        assert (await post(s, router, USER_KEY)).status == 200


async def test_global_bound_sheds_load_with_503_and_queues_nothing(start_router: StartRouter) -> None:
    router = await start_router({"limits": {"max_in_flight": 1}}, **SLOW)
    limiter = router.app[LIMITER]
    async with aiohttp.ClientSession() as s:
        stream = await s.post(router.make_url("/v1/completions"), json=completion(max_tokens=2000, stream=True))
        await stream.content.readuntil(b"\n\n")
        refused = await asyncio.gather(*[post(s, router) for _ in range(20)])
        assert {(r.status, r.headers["Retry-After"]) for r in refused} == {(503, "1")}
        assert limiter.in_flight == 1
        stream.close()
        await wait_until(lambda: limiter.in_flight == 0)
        assert (await post(s, router)).status == 200
    async with aiohttp.ClientSession() as s, s.get(router.make_url("/metrics")) as r:
        assert 'router_rejected_requests_total{key="",reason="overloaded"} 20.0' in await r.text()
