"""Hostile input against the engine server: every refusal a 4xx in OpenAI format, the server still up."""

from __future__ import annotations

import gzip

import aiohttp
import pytest

from openai_http import install_json_protocol_errors
from tests.conftest import SimServerFactory
from tests.hostile_input import (
    HOSTILE_BODIES,
    PROTOCOL_ERRORS,
    assert_still_serves,
    post,
    raw_exchange,
    status_and_error,
)


@pytest.mark.parametrize("path", [b"/v1/completions", b"/v1/chat/completions", b"/tokenize"])
@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
async def test_hostile_json_is_a_400_in_openai_format(sim_server: SimServerFactory, name: str,
                                                      path: bytes) -> None:
    server = await sim_server()
    status, err = status_and_error(await raw_exchange(server.port, post(HOSTILE_BODIES[name], path=path)))
    assert status == 400, err


async def test_a_corrupt_gzip_body_is_a_400_and_a_gzip_bomb_a_413(sim_server: SimServerFactory) -> None:
    server = await sim_server(app_kwargs={"max_body_bytes": 64 * 1024})
    status, _ = status_and_error(await raw_exchange(server.port, post(b"not gzip", b"Content-Encoding: gzip")))
    assert status == 400
    bomb = gzip.compress(b"\0" * (20 << 20))
    status, _ = status_and_error(await raw_exchange(server.port, post(bomb, b"Content-Encoding: gzip")))
    assert status == 413


@pytest.mark.parametrize("data", list(PROTOCOL_ERRORS.values()), ids=list(PROTOCOL_ERRORS))
async def test_protocol_errors_are_answered_in_openai_json(sim_server: SimServerFactory, data: bytes) -> None:
    server = await sim_server()
    install_json_protocol_errors(server.runner)
    status, _ = status_and_error(await raw_exchange(server.port, data))
    assert 400 <= status < 500


async def test_too_many_prompts_in_one_request_is_a_400(sim_server: SimServerFactory) -> None:
    server = await sim_server()
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/completions"), json={
            "model": "sim-model", "prompt": ["x"] * 10_000, "max_tokens": 1}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "prompt"


async def test_the_engine_still_serves_after_hostile_input(sim_server: SimServerFactory) -> None:
    server = await sim_server()
    for body in HOSTILE_BODIES.values():
        await raw_exchange(server.port, post(body))
    await assert_still_serves(str(server.make_url("")).rstrip("/"))
