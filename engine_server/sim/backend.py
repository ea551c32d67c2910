"""`SimBackend`: the simulated vLLM replica behind the same `Backend` interface as the real engine.

An asyncio task drives the pure `Scheduler`: while there is work it runs a step, sleeps the step's model
duration times `time_scale` and then hands each request its output, so tokens arrive when a real engine of
the profile would deliver them. Sleeps are against a running deadline, so event-loop jitter does not
accumulate into lost throughput over thousands of short steps.

With `SimConfig.kv_events` set, the cache's KV events of each step are published as one vLLM-format
`KVEventBatch` (`engine_server.kv_events`), and `/load` advertises the endpoints under `"kv_events"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine_server.backend import (
    BackendError,
    GenerationDelta,
    GenerationRequest,
    LoadReport,
    StreamDropped,
)
from engine_server.kv_events import KVEventPublisher, KVEventsSettings, with_kv_events
from engine_server.sim.faults import FaultConfig, plan_faults
from engine_server.sim.scheduler import RequestOutput, Scheduler, SchedulerConfig, SimRequest
from engine_server.sim.timing import TimingProfile, get_profile
from engine_server.sim.tokenizer import SimTokenizer, output_seed
from kv_wire import KVEventBatch, sim_tokens

log = logging.getLogger("engine_server.sim")

# When the event loop falls behind the model clock, catch up at most this much (real seconds) at once,
# so a stall does not turn into a burst of back-to-back steps.
MAX_LAG_S = 0.05


@dataclass
class SimConfig:
    model_name: str = "sim-model"
    profile: str = "h100-llama3-8b"
    num_blocks: int | None = None  # None: the profile's default
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    time_scale: float = 1.0  # real seconds slept per model second; 0 = as fast as possible
    seed: int = 0
    chars_per_token: int = 4
    faults: FaultConfig = field(default_factory=FaultConfig)
    kv_events: KVEventsSettings | None = None  # None: no KV events published

    def __post_init__(self) -> None:
        get_profile(self.profile)  # fail early on a typo
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.from_profile(
            get_profile(self.profile), num_blocks=self.num_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            block_size=self.block_size,
        )


@dataclass
class SimCounters:
    """Backend-level counts the HTTP layer or tests may read (engine-level ones are in `Scheduler.stats`)."""

    requests: int = 0
    rejected: int = 0  # failed validation (too long, empty, duplicate id)
    cancelled: int = 0  # consumer went away before the finish
    injected_errors: int = 0
    injected_hangs: int = 0
    injected_drops: int = 0


class SimBackend:
    name = "sim"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.profile: TimingProfile = get_profile(self.config.profile)
        sched_config = self.config.scheduler_config()
        self.model_name = self.config.model_name
        self.max_model_len = sched_config.effective_max_model_len
        self.tokenizer = SimTokenizer(self.config.chars_per_token)
        self.scheduler = Scheduler(sched_config, self.profile)
        self.counters = SimCounters()
        self.model_time_s = 0.0  # model seconds the engine has been busy
        self._queues: dict[str, asyncio.Queue[GenerationDelta | BaseException]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self._failure: str | None = None
        self._death: asyncio.TimerHandle | None = None
        self.kv_events: KVEventPublisher | None = None

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def failure(self) -> str | None:
        return self._failure

    async def start(self) -> None:
        if self._task is not None:
            return
        die_after = self.config.faults.die_after_s
        if die_after == 0:
            self._failure = "simulated engine failed to start (fault injection: --fault-die-after-s 0)"
            raise BackendError(self._failure, status=503)
        if self.config.kv_events is not None and self.kv_events is None:
            self.kv_events = KVEventPublisher(self.config.kv_events)
            seqs = self.scheduler._seqs  # token ids of live requests, for BlockStored.token_ids
            self.scheduler.kv.enable_events(lambda rid: seqs[rid].token_ids)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._engine_loop(), name="sim-engine")
        self._ready = True
        if die_after is not None:
            self._death = asyncio.get_running_loop().call_later(die_after, self._die, (
                f"simulated engine died {die_after:g}s after start (fault injection: --fault-die-after-s)"))

    def _die(self, reason: str) -> None:
        self._ready = False
        self._failure = reason
        self._fail_all(BackendError(reason, status=503))

    async def stop(self) -> None:
        self._ready = False
        if self._death is not None:
            self._death.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(BackendError("engine stopped", status=503))
        publisher, self.kv_events = self.kv_events, None
        if publisher is not None:
            self._publish_kv_events()
            publisher.flush(timeout_s=1.0)
            publisher.shutdown()

    def _publish_kv_events(self) -> None:
        """One batch with everything the cache did since the last call (nothing if it did nothing)."""
        if self.kv_events is not None and (events := self.scheduler.kv.take_events()):
            self.kv_events.publish(KVEventBatch(ts=time.time(), events=events))

    def _fail_all(self, exc: BackendError) -> None:
        for rid, q in list(self._queues.items()):
            self.scheduler.abort(rid)
            q.put_nowait(exc)

    # ---------------------------------------------------------------------------- engine loop

    async def _engine_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        scale = self.config.time_scale
        deadline = loop.time()
        try:
            while True:
                if not self.scheduler.has_work:
                    self._wake.clear()
                    await self._wake.wait()
                    deadline = loop.time()
                    continue
                result = self.scheduler.step()
                self._publish_kv_events()
                self.model_time_s += result.duration_s
                now = loop.time()
                deadline = max(deadline, now - MAX_LAG_S) + result.duration_s * scale
                await asyncio.sleep(max(deadline - now, 0.0))
                for out in result.outputs:
                    q = self._queues.get(out.request_id)
                    if q is not None:  # None: aborted while the step ran
                        q.put_nowait(_delta(out))
        except asyncio.CancelledError:
            raise
        except Exception:  # a simulator bug must fail requests, not leave them hanging
            log.exception("sim engine loop crashed")
            self._ready = False
            self._failure = "simulated engine crashed (see the traceback above)"
            self._fail_all(BackendError("simulated engine crashed", status=500))

    # ------------------------------------------------------------------------------- requests

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        """ChatML-like template (`kv_wire.sim_tokens`, which the router's `SimTokens` follows too)."""
        return sim_tokens.render_chat(messages, tools)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count_tokens(text)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream one request's deltas; closing or cancelling the stream aborts it in the engine."""
        if not self._ready or self._wake is None:
            raise BackendError("engine is not ready", status=503)
        rid, sampling = request.request_id, request.sampling
        self.counters.requests += 1
        prompt_ids = self.tokenizer.encode(request.prompt)
        try:
            self.scheduler.check(len(prompt_ids), sampling.max_tokens)
            if rid in self._queues:
                raise BackendError(f"duplicate request id {rid!r}", status=400, err_type="invalid_request_error")
        except BackendError:
            self.counters.rejected += 1
            raise
        plan = plan_faults(self.config.faults, self.config.seed, rid, sampling.max_tokens)
        if plan.latency_s > 0:
            await asyncio.sleep(plan.latency_s)
        if plan.error:
            self.counters.injected_errors += 1
            raise BackendError("injected engine error (fault injection)", status=500)
        if plan.hang:
            self.counters.injected_hangs += 1
            await asyncio.get_running_loop().create_future()  # never resolves; cancellation ends it
        if not self._ready:  # stopped during the injected latency
            raise BackendError("engine is not ready", status=503)
        if plan.drop_after == 0:
            self.counters.injected_drops += 1
            raise StreamDropped()

        queue: asyncio.Queue[GenerationDelta | BaseException] = asyncio.Queue()
        seed = output_seed(self.config.seed, rid, request.prompt, sampling.seed, sampling.temperature)
        self.scheduler.add(SimRequest(rid, prompt_ids, sampling.max_tokens,
                                      self.tokenizer.output_stream(seed), sampling.stop))
        self._queues[rid] = queue
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped the request
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
                if plan.drop_after is not None and item.completion_tokens >= plan.drop_after:
                    self.counters.injected_drops += 1
                    raise StreamDropped()
        finally:
            self._queues.pop(rid, None)
            if not finished and self.scheduler.abort(rid):
                self.counters.cancelled += 1

    # ---------------------------------------------------------------------------------- reports

    def load_report(self) -> LoadReport:
        s, kv = self.scheduler, self.scheduler.kv
        return with_kv_events(LoadReport(
            model=self.model_name, running=s.num_running, waiting=s.num_waiting,
            kv_blocks_used=kv.num_used_blocks, kv_blocks_total=kv.num_blocks, block_size=kv.block_size,
            prefix_cache_queries=kv.stats.queries, prefix_cache_hits=kv.stats.hits, ready=self._ready,
            backend="sim", max_num_seqs=s.config.max_num_seqs,
        ), self.config.kv_events)

    def stats(self) -> dict[str, float | int]:
        """Flat counters for debugging endpoints and benchmark reports."""
        s, kv = self.scheduler.stats, self.scheduler.kv.stats
        return {
            "model_time_s": round(self.model_time_s, 6),
            "steps": s.steps,
            "preemptions": s.preemptions,
            "requests_finished": s.requests_finished,
            "requests_aborted": s.requests_aborted,
            "prompt_tokens": s.prompt_tokens,
            "prefill_tokens_computed": s.prefill_tokens_computed,
            "generation_tokens": s.generation_tokens,
            "prefix_cache_queries": kv.queries,
            "prefix_cache_hits": kv.hits,
            "kv_evictions": kv.evictions,
            "kv_cached_blocks": self.scheduler.kv.num_cached_blocks,
            "kv_events_published": self.kv_events.published if self.kv_events is not None else 0,
            **{f"sim_{k}": v for k, v in vars(self.counters).items()},
        }


def _delta(out: RequestOutput) -> GenerationDelta:
    return GenerationDelta(text=out.text, prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
                           completion_tokens=out.completion_tokens, finish_reason=out.finish_reason)
