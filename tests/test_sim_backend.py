"""Specification of `SimBackend`: the asyncio engine loop, streaming, cancellation and fault injection."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from engine_server.backend import (
    BackendError,
    GenerationDelta,
    GenerationRequest,
    PromptTooLong,
    SamplingOptions,
    StreamDropped,
)
from engine_server.sim.backend import SimBackend, SimConfig
from engine_server.sim.faults import FaultConfig
from engine_server.sim.timing import get_profile

PROMPT = "You are a helpful assistant. " * 8  # 232 chars = 58 tokens


@contextlib.asynccontextmanager
async def started(**kw: object) -> AsyncIterator[SimBackend]:
    kw.setdefault("profile", "tiny-cpu")
    kw.setdefault("time_scale", 0.001)
    backend = SimBackend(SimConfig(**kw))  # type: ignore[arg-type]
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


def gen(rid: str, prompt: str = PROMPT, max_tokens: int = 8, **kw: object) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingOptions(max_tokens=max_tokens, **kw))  # type: ignore[arg-type]


async def collect(backend: SimBackend, request: GenerationRequest) -> list[GenerationDelta]:
    return [d async for d in backend.generate(request)]


async def test_streams_deltas_with_usage_and_a_finish_reason() -> None:
    async with started() as b:
        assert b.ready
        deltas = await collect(b, gen("a", max_tokens=8))
    assert [d.completion_tokens for d in deltas] == list(range(1, 9))
    assert [d.finish_reason for d in deltas] == [None] * 7 + ["length"]
    assert all(d.prompt_tokens == 58 and d.cached_tokens == 0 for d in deltas)
    assert len("".join(d.text for d in deltas)) == 32


async def test_second_request_reports_cached_prefix_tokens() -> None:
    async with started() as b:
        await collect(b, gen("a"))
        deltas = await collect(b, gen("b"))
        report = b.load_report()
    assert deltas[0].cached_tokens == 48  # 58 tokens -> 3 full blocks reused
    assert (report.prefix_cache_queries, report.prefix_cache_hits) == (116, 48)


async def test_concurrent_requests_batch_and_finish() -> None:
    async with started(max_num_seqs=2) as b:
        results = await asyncio.gather(*(collect(b, gen(f"r{i}", PROMPT + str(i))) for i in range(5)))
        assert b.scheduler.stats.requests_finished == 5
    assert all(r[-1].finish_reason == "length" for r in results)


async def test_sleeps_model_time_times_time_scale() -> None:
    async with started(time_scale=0.2) as b:
        t0 = time.monotonic()
        await collect(b, gen("a", max_tokens=5))
        elapsed = time.monotonic() - t0
        model = b.model_time_s
    assert model >= 5 * get_profile("tiny-cpu").step_overhead_s  # 5 steps, each at least the overhead
    assert elapsed >= model * 0.2 * 0.9


async def test_same_seed_and_ids_give_the_same_text() -> None:
    texts = []
    for _ in range(2):
        async with started(seed=42, time_scale=0) as b:
            texts.append("".join(d.text for d in await collect(b, gen("same", max_tokens=12))))
    async with started(seed=43, time_scale=0) as b:
        other = "".join(d.text for d in await collect(b, gen("same", max_tokens=12)))
    assert texts[0] == texts[1] != other


async def test_closing_the_stream_aborts_and_frees_blocks() -> None:
    async with started() as b:
        stream = b.generate(gen("a", max_tokens=1000))
        first = await anext(stream)
        assert first.completion_tokens == 1
        assert b.load_report().kv_blocks_used > 0
        await stream.aclose()  # type: ignore[attr-defined]
        assert "a" not in b.scheduler
        assert b.load_report().kv_blocks_used == 0
        assert b.counters.cancelled == 1


async def test_cancelling_the_consumer_aborts_the_request() -> None:
    async with started() as b:
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in b.generate(gen("a", max_tokens=1000)):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert (b.load_report().running, b.load_report().kv_blocks_used) == (0, 0)


async def test_too_long_prompt_is_rejected_before_any_output() -> None:
    async with started(num_blocks=8) as b:  # 128 tokens of cache
        assert b.max_model_len == 128
        with pytest.raises(PromptTooLong) as exc:
            await collect(b, gen("big", "x" * 600))
    assert exc.value.status == 400


async def test_not_ready_before_start() -> None:
    b = SimBackend(SimConfig(profile="instant"))
    assert not b.ready and not b.load_report().ready
    with pytest.raises(BackendError) as exc:
        await collect(b, gen("a"))
    assert exc.value.status == 503


async def test_load_report_describes_the_engine() -> None:
    async with started(model_name="m", num_blocks=100) as b:
        r = b.load_report()
    assert (r.model, r.backend, r.kv_blocks_total, r.block_size, r.ready) == ("m", "sim", 100, 16, True)


def test_render_chat_uses_a_chatml_template() -> None:
    b = SimBackend(SimConfig(profile="instant"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert b.render_chat(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_tools = b.render_chat(msgs, tools=[{"type": "function", "function": {"name": "f"}}])
    assert with_tools.startswith('<|im_start|>system\n# Tools\n{"function":{"name":"f"}')
    assert with_tools.endswith(b.render_chat(msgs))
    assert b.count_tokens("abcdefghi") == 3


# ---------------------------------------------------------------------------------------------- faults


async def test_error_fault_fails_before_any_output() -> None:
    async with started(faults=FaultConfig(error_rate=1.0)) as b:
        with pytest.raises(BackendError) as exc:
            await collect(b, gen("a"))
    assert exc.value.status == 500 and not isinstance(exc.value, StreamDropped)


async def test_drop_fault_cuts_the_stream_after_half_the_tokens() -> None:
    async with started(faults=FaultConfig(drop_rate=1.0)) as b:
        seen: list[GenerationDelta] = []
        with pytest.raises(StreamDropped):
            async for d in b.generate(gen("a", max_tokens=10)):
                seen.append(d)
        assert [d.completion_tokens for d in seen] == [1, 2, 3, 4, 5]
        assert b.load_report().kv_blocks_used == 0


async def test_hang_fault_never_answers_until_cancelled() -> None:
    async with started(faults=FaultConfig(hang_rate=1.0)) as b:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(collect(b, gen("a")), timeout=0.05)
        assert b.counters.injected_hangs == 1
        assert b.load_report().running == 0


async def test_added_latency_delays_the_first_token() -> None:
    async with started(time_scale=0, faults=FaultConfig(added_latency_s=0.05)) as b:
        t0 = time.monotonic()
        stream = b.generate(gen("a", max_tokens=1))
        await anext(stream)
        assert time.monotonic() - t0 >= 0.05
        await stream.aclose()  # type: ignore[attr-defined]


def test_fault_rates_split_requests_deterministically() -> None:
    from engine_server.sim.faults import plan_faults

    cfg = FaultConfig(error_rate=0.2, hang_rate=0.1, drop_rate=0.1)
    plans = [plan_faults(cfg, 0, f"r{i}", 8) for i in range(2000)]
    assert plans == [plan_faults(cfg, 0, f"r{i}", 8) for i in range(2000)]
    errors = sum(p.error for p in plans) / 2000
    assert 0.17 < errors < 0.23
    assert not any(p.error and p.hang for p in plans)


async def test_stop_fails_in_flight_streams() -> None:
    b = SimBackend(SimConfig(profile="tiny-cpu", time_scale=0.01))
    await b.start()
    stream = b.generate(gen("a", max_tokens=1000))
    await anext(stream)
    await b.stop()
    with pytest.raises(BackendError) as exc:
        await anext(stream)
    assert exc.value.status == 503
    assert not b.ready
