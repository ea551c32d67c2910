"""VllmBackend against a real vLLM engine (CPU build is fine) serving the generated tiny model.

One engine for the whole module (startup is ~40 s on CPU); run with `pytest -m vllm`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psutil
import pytest
import pytest_asyncio

pytest.importorskip("vllm")

from engine_server.backend import GenerationDelta, GenerationRequest, PromptTooLong, SamplingOptions  # noqa: E402
from engine_server.tiny_model import generate as generate_tiny_model  # noqa: E402
from engine_server.vllm_backend import VllmBackend, VllmConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

MAX_MODEL_LEN = 1024
LONG_PREFIX = "You are a helpful assistant. Answer briefly and politely. " * 30  # ~300 tokens


def _engine_children() -> list[psutil.Process]:
    alive = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and p.name().startswith("VLLM"):
                alive.append(p)
    return alive


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmBackend]:
    model = generate_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    b = VllmBackend(VllmConfig(model=str(model), served_model_name="tiny", max_model_len=MAX_MODEL_LEN,
                               block_size=32, max_num_seqs=16))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()
        assert not b.ready
        assert not _engine_children(), "engine processes left behind"


async def _collect(b: VllmBackend, prompt: str, **sampling: object) -> list[GenerationDelta]:
    request = GenerationRequest(f"t{id(prompt)}", prompt, SamplingOptions(**sampling))  # type: ignore[arg-type]
    async with contextlib.aclosing(b.generate(request)) as stream:
        return [d async for d in stream]


async def test_ready_and_load_report(backend: VllmBackend) -> None:
    assert backend.ready and backend.model_name == "tiny" and backend.max_model_len == MAX_MODEL_LEN
    report = backend.load_report()
    assert report.ready and report.backend == "vllm" and report.block_size == 32
    assert report.kv_blocks_total > 0 and report.running == report.waiting == report.kv_blocks_used == 0
    assert report.max_num_seqs > 0  # the router prices slot waits with it


async def test_repeated_prefix_hits_the_cache(backend: VllmBackend) -> None:
    before = backend.load_report()
    first = await _collect(backend, LONG_PREFIX + "Question one?", max_tokens=2, temperature=0.0)
    second = await _collect(backend, LONG_PREFIX + "Question two?", max_tokens=2, temperature=0.0)
    assert first[-1].prompt_tokens > 256
    assert second[-1].cached_tokens > 0 and second[-1].cached_tokens % 32 == 0
    assert second[-1].cached_tokens >= 256 - 32
    after = backend.load_report()
    assert after.prefix_cache_hits - before.prefix_cache_hits >= second[-1].cached_tokens
    assert after.prefix_cache_queries - before.prefix_cache_queries >= first[-1].prompt_tokens


async def test_streaming_deltas_are_cumulative(backend: VllmBackend) -> None:
    prompt = "Write a short poem about the ocean."
    deltas = await _collect(backend, prompt, max_tokens=16, ignore_eos=True, temperature=1.0, seed=7)
    assert len(deltas) >= 4
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and counts[-1] == 16
    assert all(d.prompt_tokens == backend.count_tokens(prompt) for d in deltas)
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas)


async def test_stop_string_ends_with_stop(backend: VllmBackend) -> None:
    prompt = "The weather today is"
    free = "".join(d.text for d in await _collect(backend, prompt, max_tokens=24, ignore_eos=True, temperature=0.0))
    stop = next((free[i:i + 2] for i in range(len(free) // 2, len(free) - 1) if free[i:i + 2].strip()), None)
    assert stop, free
    deltas = await _collect(backend, prompt, max_tokens=24, ignore_eos=True, temperature=0.0, stop=(stop,))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    assert stop not in text and free.startswith(text)


async def test_cancel_aborts_engine_request(backend: VllmBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = backend.engine
    aborted: list[str] = []
    real_abort = engine.abort

    async def spy(request_id: object, internal: bool = False) -> None:
        aborted.append(str(request_id))
        await real_abort(request_id, internal)

    monkeypatch.setattr(engine, "abort", spy)
    got = asyncio.Event()

    async def consume() -> None:
        request = GenerationRequest("cancel-me", "Tell me a long story.",
                                    SamplingOptions(max_tokens=900, ignore_eos=True))
        async for _ in backend.generate(request):
            got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), 30)
    assert backend.load_report().running == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert any(r.startswith("cancel-me") for r in aborted)
    assert backend.load_report().running == 0
    assert engine.get_num_unfinished_requests() == 0  # gone from the frontend's output processor
    # The scheduler only reports after a step: run one short request; had the engine core not seen the
    # abort, the 900-token request would still be running in that report.
    await _collect(backend, "Hello", max_tokens=2, temperature=0.0)
    assert backend.engine_load.running == 0 and backend.engine_load.waiting == 0


async def test_closing_the_iterator_aborts(backend: VllmBackend) -> None:
    request = GenerationRequest("close-me", "Count to a thousand.", SamplingOptions(max_tokens=900, ignore_eos=True))
    stream = backend.generate(request)
    await stream.__anext__()
    await stream.aclose()
    assert backend.load_report().running == 0
    assert backend.engine.get_num_unfinished_requests() == 0


async def test_prompt_too_long(backend: VllmBackend) -> None:
    text = "word " * (MAX_MODEL_LEN + 10)
    assert backend.count_tokens(text) > MAX_MODEL_LEN
    with pytest.raises(PromptTooLong) as info:
        await _collect(backend, text, max_tokens=1)
    assert info.value.status == 400
    assert backend.load_report().running == 0


async def test_chat_template_renders_every_message(backend: VllmBackend) -> None:
    messages = [
        {"role": "system", "content": "SYSTEM-TEXT"},
        {"role": "user", "content": "USER-TEXT"},
        {"role": "assistant", "content": "ASSISTANT-TEXT", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "TOOL-ARG"}'}},
        ]},
        {"role": "tool", "content": "TOOL-RESULT", "tool_call_id": "c1"},
        {"role": "user", "content": "FOLLOW-UP"},
    ]
    tools = [{"type": "function", "function": {"name": "lookup", "description": "TOOL-DESC"}}]
    text = backend.render_chat(messages, tools)
    positions = [text.index(s) for s in ("SYSTEM-TEXT", "TOOL-DESC", "USER-TEXT", "ASSISTANT-TEXT", "TOOL-ARG",
                                         "TOOL-RESULT", "FOLLOW-UP")]
    assert positions == sorted(positions)
    assert text.endswith("<|im_start|>assistant\n")
    assert "TOOL-DESC" not in backend.render_chat(messages)
    # The template writes BOS itself: the engine must not get a second one.
    tok = backend.engine.get_tokenizer()
    assert backend.count_tokens(text) == len(tok.encode(text, add_special_tokens=False))
    deltas = await _collect(backend, text, max_tokens=1, temperature=0.0)
    assert deltas[-1].completion_tokens == 1
