"""The simulated engine's core: continuous batching over a paged prefix cache, in model time.

Pure and synchronous on purpose (no asyncio, no clock): `step()` schedules one batch and returns how long
it takes in model seconds plus what each request produced, so the same core drives the asyncio backend
(which sleeps `duration * time_scale`) and an offline discrete-event simulator (which just adds it up).

Scheduling follows vLLM v1 (chunked prefill always on):
1. Running requests first, in admission order: each gets its remaining tokens (1 for a decode, the rest
   of its prompt for a chunked prefill) within the step's token budget. If the KV cache cannot hold them,
   the most recently admitted running request is preempted (blocks freed, back to the front of the
   waiting queue, recomputed later), repeatedly, possibly the request itself.
2. If nobody was preempted, waiting requests are admitted FCFS while the batch has room (`max_num_seqs`)
   and budget remains; each reuses its longest cached prefix and computes at most the budget's worth.
3. A request whose prompt (or recompute) completes this step samples one token at the end of the step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine_server.backend import BackendError, PromptTooLong
from engine_server.sim.kv_cache import KVCache, extend_block_hashes
from engine_server.sim.timing import TimingProfile
from engine_server.sim.tokenizer import OutputStream


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int = 16
    hash_seed: int = 0

    @classmethod
    def from_profile(cls, profile: TimingProfile, **overrides: int | None) -> SchedulerConfig:
        """The profile's engine shape, with any non-None override applied."""
        values = {
            "num_blocks": profile.num_blocks,
            "max_num_seqs": profile.max_num_seqs,
            "max_num_batched_tokens": profile.max_num_batched_tokens,
            "max_model_len": profile.max_model_len,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def effective_max_model_len(self) -> int:
        """A sequence must fit in the whole cache, or it could never finish (vLLM refuses to start)."""
        return min(self.max_model_len, self.num_blocks * self.block_size)


@dataclass(slots=True)
class SimRequest:
    """One sequence to run: already tokenized, with its output source (see `SimTokenizer.output_stream`)."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    output: OutputStream
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one request produced in one step (only requests that sampled a token appear)."""

    request_id: str
    token_id: int
    text: str  # newly visible text (stop-string holdback applied)
    first: bool  # this is the request's first token
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache at first admission
    completion_tokens: int  # cumulative
    finish_reason: str | None = None  # "stop" | "length"


@dataclass(frozen=True, slots=True)
class StepResult:
    duration_s: float  # model seconds
    outputs: list[RequestOutput]
    prefill_tokens: int = 0  # prompt (or recompute) tokens computed this step, cache hits excluded
    decode_seqs: int = 0
    preempted: tuple[str, ...] = ()
    kv_usage: float = 0.0

    @property
    def num_scheduled_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    busy_s: float = 0.0  # model seconds spent in non-empty steps
    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    generation_tokens: int = 0


@dataclass(slots=True, eq=False)
class _Seq:
    req: SimRequest
    token_ids: list[int]  # prompt + generated
    num_prompt: int
    hashes: list[int] = field(default_factory=list)  # full-block hash chain over token_ids
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached: int = -1  # cached prompt tokens at first admission (-1: not admitted yet)
    num_output: int = 0
    num_preemptions: int = 0
    pending: str = ""  # generated text held back because it may begin a stop string
    holdback: int = -1  # longest stop string - 1; -1 without stop strings
    stops: tuple[str, ...] = ()
    running: bool = False


def check_request(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """The engine's refusal of a request that can never run (shared by `Scheduler` and the fast model)."""
    if num_prompt_tokens < 1:
        raise BackendError("prompt must not be empty", status=400, err_type="invalid_request_error")
    if max_tokens < 1:
        raise BackendError("max_tokens must be at least 1", status=400, err_type="invalid_request_error")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
            "in the completion)."
        )


def is_decode(n: int, num_output: int, num_computed: int, num_tokens: int) -> bool:
    """A scheduled chunk of ``n`` tokens is a decode (not prefill/recompute) step: one new token after
    the first, for a sequence whose every earlier token is computed. Step cost counts it as a decode."""
    return n == 1 and num_output > 0 and num_computed == num_tokens - 1


def may_admit(preempted: bool, num_waiting: int, budget: int, num_running: int, max_num_seqs: int) -> bool:
    """Whether a step admits (another) waiting request: only when memory was not short this step (nobody
    preempted), tokens remain in the budget and the batch has room."""
    return not preempted and num_waiting > 0 and budget > 0 and num_running < max_num_seqs


class Scheduler:
    """Continuous-batching scheduler + KV cache. Deterministic: same calls, same results."""

    def __init__(self, config: SchedulerConfig, timing: TimingProfile) -> None:
        self.config = config
        self.timing = timing
        self.kv = KVCache(config.num_blocks, config.block_size, config.hash_seed)
        self.running: list[_Seq] = []
        self.waiting: deque[_Seq] = deque()
        self._seqs: dict[str, _Seq] = {}
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------------------------ queries

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seqs

    # ----------------------------------------------------------------------------------- requests

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise the error a request of this size would get, before anything is queued."""
        check_request(num_prompt_tokens, max_tokens, self.config.effective_max_model_len)

    def add(self, request: SimRequest) -> None:
        self.check(len(request.prompt_token_ids), request.max_tokens)
        if request.request_id in self._seqs:
            raise BackendError(f"duplicate request id {request.request_id!r}", status=400,
                               err_type="invalid_request_error")
        seq = _Seq(request, list(request.prompt_token_ids), len(request.prompt_token_ids))
        seq.stops = tuple(s for s in request.stop if s)
        seq.holdback = max((len(s) for s in seq.stops), default=0) - 1
        extend_block_hashes(seq.hashes, seq.token_ids, self.config.block_size, self.config.hash_seed)
        self._seqs[request.request_id] = seq
        self.waiting.append(seq)
        self.stats.requests_added += 1
        self.stats.prompt_tokens += seq.num_prompt

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks at once. False if unknown or finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(request_id)
        self.stats.requests_aborted += 1
        return True

    # --------------------------------------------------------------------------------------- step

    def step(self) -> StepResult:
        cfg, kv = self.config, self.kv
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        preempted: list[str] = []

        # 1. Running requests: decodes and continuing prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            fits = True
            while fits and not kv.allocate(seq.req.request_id, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.req.request_id)
                fits = victim is not seq
            if not fits:
                break
            self._schedule(seq, n, scheduled)
            budget -= n
            i += 1

        # 2. Waiting requests, FCFS, only if memory was not short this step.
        while may_admit(bool(preempted), len(self.waiting), budget, len(self.running), cfg.max_num_seqs):
            seq = self.waiting[0]
            extend_block_hashes(seq.hashes, seq.token_ids, cfg.block_size, cfg.hash_seed)
            hit = kv.lookup(seq.hashes, len(seq.token_ids))
            num_hit = len(hit) * cfg.block_size
            n = min(len(seq.token_ids) - num_hit, budget)
            if not kv.allocate(seq.req.request_id, num_hit + n, hit):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.running = True
            seq.num_computed = num_hit
            if seq.num_cached < 0:
                seq.num_cached = num_hit
                kv.record_query(seq.num_prompt, num_hit)
            self._schedule(seq, n, scheduled)
            budget -= n

        # 3. Cost of the batch, then its results.
        prefill = decode = 0
        for seq, n in scheduled:
            if is_decode(n, seq.num_output, seq.num_computed, len(seq.token_ids)):
                decode += 1
            else:
                prefill += n
        usage = kv.usage
        duration = self.timing.step_time_s(prefill, decode, usage)
        outputs = [out for seq, n in scheduled if (out := self._advance(seq, n)) is not None]
        if any(o.finish_reason for o in outputs):
            self.running = [s for s in self.running if s.running]
        st = self.stats
        if scheduled:
            st.steps += 1
            st.busy_s += duration
        st.prefill_tokens_computed += prefill
        st.preemptions += len(preempted)
        return StepResult(duration, outputs, prefill, decode, tuple(preempted), usage)

    def _schedule(self, seq: _Seq, n: int, scheduled: list[tuple[_Seq, int]]) -> None:
        """Record `n` tokens for this step and publish the blocks they fill (visible to later requests)."""
        extend_block_hashes(seq.hashes, seq.token_ids, self.config.block_size, self.config.hash_seed)
        self.kv.cache_full_blocks(seq.req.request_id, seq.hashes, seq.num_computed + n)
        scheduled.append((seq, n))

    def _preempt(self, seq: _Seq) -> None:
        self.kv.free(seq.req.request_id)
        seq.running = False
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _advance(self, seq: _Seq, n: int) -> RequestOutput | None:
        """Account for `n` computed tokens; sample a token if the sequence is now fully computed."""
        seq.num_computed += n
        if seq.num_computed < len(seq.token_ids):
            return None
        req = seq.req
        token_id, piece = req.output.next_token()
        seq.token_ids.append(token_id)
        seq.num_output += 1
        self.stats.generation_tokens += 1
        finish = None
        if seq.holdback < 0:
            text = piece
        else:
            # Held-back text covers every position where a stop string completed by `piece` can start.
            buf = seq.pending + piece
            hits = [p for s in seq.stops if (p := buf.find(s)) >= 0]
            if hits:
                text, finish = buf[: min(hits)], "stop"
            else:
                # While running, hold back a possible stop-string prefix, as vLLM's detokenizer does.
                cut = len(buf) if seq.num_output >= req.max_tokens else max(len(buf) - seq.holdback, 0)
                text, seq.pending = buf[:cut], buf[cut:]
        if finish is None and seq.num_output >= req.max_tokens:
            finish = "length"
        if finish is not None:
            self._finish(seq)
        return RequestOutput(req.request_id, token_id, text, seq.num_output == 1, seq.num_prompt,
                             max(seq.num_cached, 0), seq.num_output, finish)

    def _finish(self, seq: _Seq) -> None:
        del self._seqs[seq.req.request_id]
        seq.running = False
        self.kv.free(seq.req.request_id)
        self.stats.requests_finished += 1

    # ------------------------------------------------------------------------------ conveniences

    def run_to_completion(self, max_steps: int = 1_000_000) -> tuple[float, list[StepResult]]:
        """Step until idle; returns total model seconds and every step (for tests and offline use)."""
        total, steps = 0.0, []
        for _ in range(max_steps):
            if not self.has_work:
                break
            r = self.step()
            total += r.duration_s
            steps.append(r)
        return total, steps

