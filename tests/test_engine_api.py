"""The engine server's OpenAI API, specified against the sim backend (fast, deterministic)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.conftest import SimServerFactory

LONG_PREFIX = "You are a helpful assistant that answers questions about the solar system. " * 8


async def post(server, path: str, body: object, **kw):
    async with aiohttp.ClientSession() as s, s.post(server.make_url(path), json=body, **kw) as r:
        return r.status, await r.json(), r.headers.copy()


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    raw = (await resp.read()).decode()
    return [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]


async def test_completion_has_openai_shape(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    status, body, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": 5})
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["model"] == "sim-model"
    assert body["choices"][0]["index"] == 0
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert "cached_tokens" in body["usage"]["prompt_tokens_details"]


async def test_chat_completion_has_openai_shape(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    status, body, _ = await post(srv, "/v1/chat/completions", {
        "model": "sim-model", "max_tokens": 4,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]})
    assert status == 200
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    assert body["usage"]["completion_tokens"] == 4


async def test_repeated_prefix_reports_cached_tokens(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    first = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": LONG_PREFIX + "Q1", "max_tokens": 2})
    second = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": LONG_PREFIX + "Q2", "max_tokens": 2})
    assert first[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert cached % 16 == 0 and cached <= second[1]["usage"]["prompt_tokens"]


async def test_stream_chat_sends_role_then_content_then_done(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    body = {"model": "sim-model", "max_tokens": 6, "stream": True,
            "messages": [{"role": "user", "content": "tell me"}]}
    async with aiohttp.ClientSession() as s, s.post(srv.make_url("/v1/chat/completions"), json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text
    assert "usage" not in chunks[0]


async def test_stream_include_usage_adds_a_final_usage_chunk(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    body = {"model": "sim-model", "prompt": "abc", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s, s.post(srv.make_url("/v1/completions"), json=body) as r:
        events = await sse_events(r)
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert "cached_tokens" in last["usage"]["prompt_tokens_details"]


async def test_n_returns_that_many_choices(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    status, body, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "x", "n": 3,
                                                          "max_tokens": 2})
    assert status == 200
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]


async def test_stop_string_ends_with_finish_reason_stop(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    _, full, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "x", "max_tokens": 12,
                                                     "seed": 1})
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    _, cut, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "x", "max_tokens": 12,
                                                    "seed": 1, "stop": [stop]})
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert stop not in cut["choices"][0]["text"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x"}, "model"),
    ({"model": "sim-model", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "sim-model", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "sim-model", "prompt": 3}, "prompt"),
    ({"model": "sim-model", "prompt": "x", "n": 100}, "n"),
])
async def test_invalid_fields_get_400_naming_the_field(sim_server: SimServerFactory, body, param) -> None:
    srv = await sim_server()
    status, err, _ = await post(srv, "/v1/completions", body)
    assert status == 400
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"].split(".")[0] == param


async def test_malformed_json_gets_400(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    async with aiohttp.ClientSession() as s, s.post(srv.make_url("/v1/completions"), data=b"{nope") as r:
        assert r.status == 400
        assert "not valid JSON" in (await r.json())["error"]["message"]


async def test_unknown_model_gets_404_model_not_found(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    status, err, _ = await post(srv, "/v1/chat/completions",
                                {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404
    assert err["error"]["code"] == "model_not_found"


async def test_body_over_limit_gets_413(sim_server: SimServerFactory) -> None:
    srv = await sim_server(app_kwargs={"max_body_bytes": 2048})
    status, err, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "x" * 5000})
    assert status == 413
    assert "too large" in err["error"]["message"]


async def test_prompt_over_context_length_gets_400(sim_server: SimServerFactory) -> None:
    srv = await sim_server(max_model_len=64)
    status, err, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "word " * 200})
    assert status == 400
    assert err["error"]["code"] == "context_length_exceeded"


async def test_unknown_path_gets_openai_404(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    async with aiohttp.ClientSession() as s, s.get(srv.make_url("/v1/nope")) as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"


async def test_request_id_is_echoed_or_minted(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    _, _, given = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "x"},
                             headers={"X-Request-Id": "abc-123"})
    _, _, minted = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": "x"})
    assert given["X-Request-Id"] == "abc-123"
    assert len(minted["X-Request-Id"]) >= 16


async def test_models_health_load_and_metrics(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    await post(srv, "/v1/completions", {"model": "sim-model", "prompt": LONG_PREFIX})
    async with aiohttp.ClientSession() as s:
        async with s.get(srv.make_url("/v1/models")) as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["sim-model"]
        async with s.get(srv.make_url("/health")) as r:
            assert r.status == 200
        async with s.get(srv.make_url("/load")) as r:
            load = await r.json()
        async with s.get(srv.make_url("/metrics")) as r:
            text = await r.text()
    assert load["kv_blocks_total"] > 0 and load["block_size"] == 16
    assert load["prefix_cache_queries"] > 0
    from engine_server.metrics import METRIC_NAMES

    for name in METRIC_NAMES:
        assert name in text, name
    assert 'vllm:prompt_tokens_total{model_name="sim-model"}' in text


async def test_client_disconnect_aborts_the_engine_request(sim_server: SimServerFactory) -> None:
    srv = await sim_server(profile="llmd-8b", time_scale=1.0)
    from engine_server.app import STATE

    backend = srv.app[STATE].backend
    body = {"model": "sim-model", "prompt": "hello", "max_tokens": 2000, "stream": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(srv.make_url("/v1/completions"), json=body)
        await r.content.readuntil(b"\n\n")
        assert backend.load_report().running == 1
        r.close()
    deadline = time.monotonic() + 30  # a hang guard: met at once unless the host is very busy
    while backend.load_report().running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert backend.load_report().running == 0
    assert backend.load_report().waiting == 0


async def test_tokenize_prompt_has_vllm_shape_and_matches_usage(sim_server: SimServerFactory) -> None:
    """vllm-router's cache_aware policy tokenizes through POST /tokenize; ids must be what the engine prefills."""
    srv = await sim_server()
    status, body, _ = await post(srv, "/tokenize", {"model": "sim-model", "prompt": LONG_PREFIX})
    assert status == 200
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) > 0
    assert all(isinstance(t, int) for t in body["tokens"])
    _, done, _ = await post(srv, "/v1/completions", {"model": "sim-model", "prompt": LONG_PREFIX, "max_tokens": 1})
    assert body["count"] == done["usage"]["prompt_tokens"]
    _, again, _ = await post(srv, "/tokenize", {"prompt": LONG_PREFIX, "add_special_tokens": True})
    assert again["tokens"] == body["tokens"]  # deterministic; model optional, unknown vLLM fields ignored


async def test_tokenize_chat_messages_uses_the_chat_template(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    status, body, _ = await post(srv, "/tokenize", {"model": "sim-model", "messages": messages})
    assert status == 200
    _, done, _ = await post(srv, "/v1/chat/completions", {"model": "sim-model", "messages": messages,
                                                          "max_tokens": 1})
    assert body["count"] == done["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, status", [
    ({"model": "nope", "prompt": "hi"}, 404),
    ({"model": "sim-model"}, 400),
    ({"model": "sim-model", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400),
])
async def test_tokenize_errors_are_openai_shaped(sim_server: SimServerFactory, body, status) -> None:
    srv = await sim_server()
    got, err, _ = await post(srv, "/tokenize", body)
    assert got == status
    assert "message" in err["error"]


def test_tokenize_uses_each_backends_real_encoder() -> None:
    """/tokenize must return the ids the engine prefills: the sim's chunk hashes, vLLM's tokenizer (BOS once)."""
    from engine_server.sim.backend import SimBackend, SimConfig
    from engine_server.vllm_backend import VllmBackend, VllmConfig

    sim = SimBackend(SimConfig(model_name="sim-model", profile="instant"))
    assert sim.encode("abcdefgh") == sim.tokenizer.encode("abcdefgh")

    class FakeTokenizer:
        bos_token = "<s>"

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    vllm = VllmBackend(VllmConfig(model="unused"))
    vllm._tokenizer = FakeTokenizer()
    encode = vllm.encode
    assert encode("hi") == [1, ord("h"), ord("i")]
    assert encode("<s>hi")[:1] == [ord("<")]  # the chat template wrote BOS: not added twice
