"""The unmodified `openai` SDK (sync and async, streaming and not) against a sim engine server."""

from __future__ import annotations

import asyncio

import openai

from tests.conftest import SimServerFactory


def _base(server) -> str:
    return str(server.make_url("/v1"))


async def test_async_sdk_chat_non_streaming(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    client = openai.AsyncOpenAI(base_url=_base(srv), api_key="unused")
    out = await client.chat.completions.create(model="sim-model", max_tokens=5,
                                               messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens_details is not None
    await client.close()


async def test_async_sdk_chat_streaming_with_usage(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    client = openai.AsyncOpenAI(base_url=_base(srv), api_key="unused")
    stream = await client.chat.completions.create(
        model="sim-model", max_tokens=6, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}])
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces)
    assert usage is not None and usage.completion_tokens == 6
    await client.close()


async def test_sync_sdk_completions_streaming_and_not(sim_server: SimServerFactory) -> None:
    srv = await sim_server()

    def run() -> tuple[str, str]:
        client = openai.OpenAI(base_url=_base(srv), api_key="unused")
        whole = client.completions.create(model="sim-model", prompt="once upon", max_tokens=4, seed=7)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="sim-model", prompt="once upon", max_tokens=4, seed=7, stream=True) if c.choices)
        client.close()
        return whole.choices[0].text, streamed

    whole, streamed = await asyncio.to_thread(run)
    assert whole and whole == streamed


async def test_sdk_raises_not_found_for_unknown_model(sim_server: SimServerFactory) -> None:
    srv = await sim_server()
    client = openai.AsyncOpenAI(base_url=_base(srv), api_key="unused", max_retries=0)
    try:
        await client.completions.create(model="nope", prompt="x")
    except openai.NotFoundError as exc:
        assert exc.status_code == 404
    else:
        raise AssertionError("expected NotFoundError")
    finally:
        await client.close()
