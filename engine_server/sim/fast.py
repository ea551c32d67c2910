"""A fast engine model beside `Scheduler`: continuous batching whose decode phases jump, not step.

Why: driving `engine_server.sim.scheduler.Scheduler` costs Python bookkeeping per output token per
sequence (~25 us), which caps `benchmarks.simulate` at ~800 requests per CPU second. This model keeps
the engine's semantics where routing is judged and changes only how time advances:

- **Same scheduling, shared rules.** The refusal of impossible requests (`check_request`), when a step may
  admit (`may_admit`) and what counts as a decode (`is_decode`) are the scheduler's own functions.
  Running sequences first in admission order (decode token or next prefill chunk
  within ``max_num_batched_tokens``; preempt the last admitted when blocks run out), then waiting ones
  FCFS while ``max_num_seqs`` and the budget allow. A step costs ``TimingProfile.step_time_s``; the first
  token is emitted at the end of the step that completes the prefill.
- **Decode windows.** Between events that change a replica's batch (an admission, a prefill finishing,
  a sequence finishing) every step is a decode step of the same sequences and has the same duration, so
  one event covers the whole window up to the next finish. An arrival that could be admitted cuts the
  window at the end of the step in progress, exactly where the stepped engine would admit it.
- **Same prefix cache, at block granularity.** An LRU of block hashes with the KV capacity: blocks of
  running sequences are pinned (ref counts), released blocks join the free queue tail first and keep
  their hash until the allocator reuses them, a hit is the chain from the first block, never the whole
  prompt, and blocks are published when scheduled — `engine_server.sim.kv_cache.KVCache`'s rules. Only
  prompt blocks carry a hash (generated ids are unique per request, so decode blocks are never hit in
  these workloads; they take space like any block).
- **Requests as hash chains.** A request is its prompt length and the hash chain of its full prompt
  blocks (the simulator's `benchmarks.sim_engines.ChainEncoder` builds them from text without tokenizing);
  any chain works as long as equal prefixes give equal hashes.
- **Why not the scheduler's own classes:** the pool is kept as counts plus an LRU of hashes (not one
  object per block) so that a decode window of ``k`` steps costs O(sequences), not O(k x sequences).
  `tests/test_sim_fast.py` runs both on the same requests and compares every request's
  first-token and finish step exactly.

Approximations (docs/simulator.md): a profile's KV-usage slowdown is read at a window's start; load
reports show the blocks in use at the last batch change; a preempted sequence's decode blocks are not
reusable on recompute.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine_server.sim.scheduler import SchedulerConfig, check_request, is_decode, may_admit
from engine_server.sim.timing import TimingProfile

_EPS = 1e-9


@dataclass(eq=False, slots=True)
class _Seq:
    rid: str
    prompt: int
    max_tokens: int
    chain: list[int]
    computed: int = 0  # tokens whose KV is computed
    output: int = 0  # tokens sampled
    held: int = 0  # KV blocks held
    keys: list[int | None] = field(default_factory=list)  # per leading block: hash it pins, None if unhashed
    cached: int = -1  # prompt tokens hit at first admission
    last_emit: float = 0.0
    gap_sum: float = 0.0
    itl: list[float] | None = None


@dataclass(slots=True)
class Emit:
    """What the simulator needs from a sequence event: a first token, a finish, or both."""

    request_id: str
    first: bool
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    itl: list[float]  # every gap, or the mean gap only (``keep_itl=False``)


class FastEngine:
    """One replica: continuous batching and a block-hash prefix cache, advanced one batch change at a time.

    Driven by the simulator as ``start(now) -> end time`` of the next segment (one step, or a decode
    window of many), ``finish(now) -> emits`` at that time, and ``arrive(now)`` after each `add` while a
    segment runs (returns the segment's new end if the arrival cuts a window). ``epoch`` changes with
    every new or shortened segment, so the simulator can drop a superseded end event.
    """

    def __init__(self, config: SchedulerConfig, timing: TimingProfile, keep_itl: bool = True) -> None:
        self.timing = timing
        self.num_blocks = config.num_blocks
        self.block_size = config.block_size
        self.max_seqs = self.max_num_seqs = config.max_num_seqs
        self.max_batched = config.max_num_batched_tokens
        self.max_len = config.effective_max_model_len
        self.keep_itl = keep_itl
        self.running: list[_Seq] = []
        self.waiting: deque[_Seq] = deque()
        self.ref: dict[int, int] = {}  # cached block hash -> sequences pinning it (0: in the free queue)
        # Free blocks, next victim first: a hash >= 0 is one cached block; a key < 0 is a run of
        # unhashed blocks (count in _runs), since which of those goes first makes no difference.
        self.lru: OrderedDict[int, None] = OrderedDict()
        self._runs: dict[int, int] = {}
        self._tail_run = 0  # key of the run last appended, if it is still the queue's tail
        self._queued = 0  # blocks in the queue
        self.fresh = config.num_blocks  # never-used free blocks (ahead of the queue)
        self._anon = 0
        self.epoch = 0
        self.steps = 0
        self.preemptions = 0
        self.queries = self.hits = 0
        self._used_at_change = 0
        # the segment under way
        self._t0 = 0.0
        self._d = 0.0
        self._k = 0  # steps in a decode window; 0 for a single scheduled step
        self.last_start = 0.0  # when the segment's last step starts (the stepped engine's push time)
        self._scheduled: list[tuple[_Seq, int]] = []

    # -------------------------------------------------------------------------------------- queries

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_free(self) -> int:
        return self.fresh + self._queued

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.fresh - self._queued

    def load(self) -> tuple[int, int, int]:
        """running, waiting, KV blocks in use (as of the last batch change) for the router's poll."""
        return len(self.running), len(self.waiting), self._used_at_change

    # ------------------------------------------------------------------------------------- requests

    def add(self, rid: str, prompt_tokens: int, chain: list[int], max_tokens: int) -> None:
        """Queue a request; raises the errors `Scheduler.check` raises, before anything is queued."""
        check_request(prompt_tokens, max_tokens, self.max_len)
        self.waiting.append(_Seq(rid, prompt_tokens, max_tokens, chain, itl=[] if self.keep_itl else None))

    def arrive(self, now: float) -> float | None:
        """After `add` during a window: end it with the step in progress if the newcomer can be admitted."""
        if self._k <= 1 or len(self.waiting) != 1 or not self._admissible():
            return None
        j = math.floor((now - self._t0) / self._d + _EPS) + 1  # steps started by `now`
        if j >= self._k:
            return None
        self._k = j
        self.epoch += 1
        return self._ends(j)

    def _ends(self, k: int) -> float:
        """End of step ``k`` of the window, summed step by step as the stepped engine's clock is (same
        floating-point rounding, so simultaneous events stay simultaneous); `last_start` is set too."""
        t = self._t0
        for _ in range(k - 1):
            t += self._d
        self.last_start = t
        return t + self._d

    # ---------------------------------------------------------------------------------- KV model

    def _pop(self, n: int) -> None:
        """Allocate ``n`` blocks: never-used ones first, then the free queue's head (evicting its hash)."""
        take = min(n, self.fresh)
        self.fresh -= take
        n -= take
        self._queued -= n
        lru, ref, runs = self.lru, self.ref, self._runs
        pop = lru.popitem
        while n > 0:
            k = pop(last=False)[0]
            if k >= 0:
                del ref[k]
                n -= 1
                continue
            c = runs[k]
            if c > n:  # part of a run: the rest stays at the head of the queue
                runs[k] = c - n
                lru[k] = None
                lru.move_to_end(k, last=False)
                return
            del runs[k]
            n -= c

    def _queue_unhashed(self, n: int) -> None:
        runs = self._runs
        if self._tail_run in runs:
            runs[self._tail_run] += n
        else:
            self._anon -= 1
            self._tail_run = self._anon
            runs[self._anon] = n
            self.lru[self._anon] = None
        self._queued += n

    def _free(self, s: _Seq) -> None:
        """Release tail first, as `KVCache.free` does, so a prompt's end is evicted before its start."""
        lru, ref = self.lru, self.ref
        keys = s.keys
        if s.held > len(keys):
            self._queue_unhashed(s.held - len(keys))
        queued = 0  # blocks queued here; only their count and order matter, not when the count moves
        ended = False  # a hashed block was queued after the last run: that run is no longer the tail
        for k in reversed(keys):
            if k is None:
                if ended:
                    self._tail_run = 0
                    ended = False
                self._queue_unhashed(1)
                continue
            r = ref[k] - 1
            ref[k] = r
            if r == 0:
                lru[k] = None
                queued += 1
                ended = True
        if ended:
            self._tail_run = 0
        self._queued += queued
        s.held = 0
        s.keys = []

    def _publish(self, s: _Seq, tokens: int) -> None:
        """The sequence's prompt blocks fully covered by ``tokens`` become hits (first copy wins)."""
        chain = s.chain
        keys = s.keys
        start, end = len(keys), min(tokens // self.block_size, len(chain))
        if start >= end:
            return
        ref, append = self.ref, keys.append
        for h in chain[start:end]:
            if h in ref:
                append(None)
            else:
                ref[h] = 1
                append(h)

    def _lookup(self, s: _Seq) -> tuple[int, int]:
        """(hit blocks, tokens left to compute) for admitting ``s``: never the last token."""
        total = s.prompt + s.output
        ref = self.ref
        hits = 0
        for h in s.chain[:(total - 1) // self.block_size]:
            if h not in ref:
                break
            hits += 1
        return hits, total - hits * self.block_size

    def _admissible(self) -> bool:
        """Would the next step admit the head of the queue? (Only asked when the batch is all decodes.)"""
        if not self.waiting or len(self.running) >= self.max_seqs:
            return False
        budget = self.max_batched - len(self.running)
        if budget <= 0:
            return False
        s = self.waiting[0]
        hits, rest = self._lookup(s)
        n = min(rest, budget)
        bs = self.block_size
        need = -(-(hits * bs + n) // bs) - hits
        ref = self.ref
        reclaimed = 0  # cached blocks a hit takes back from the free queue
        for h in s.chain[:hits]:
            if ref[h] == 0:
                reclaimed += 1
        return need <= self.num_free - reclaimed

    # ----------------------------------------------------------------------------------- segments

    def start(self, now: float) -> float:
        """Plan the next segment from ``now``; returns when it ends (its outputs come from `finish`)."""
        self.epoch += 1
        self._t0 = now
        running = self.running
        decoding = bool(running)  # every running sequence is past its prefill
        for s in running:
            if not (s.output > 0 and s.computed == s.prompt + s.output - 1):
                decoding = False
                break
        if decoding and not self._admissible():
            k = min(s.max_tokens - s.output for s in running)
            k = self._fit(k)
            if k > 0:
                usage = min(self.num_used + len(running), self.num_blocks) / self.num_blocks
                self._d = self.timing.step_time_s(0, len(running), usage)
                self._k = k
                return self._ends(k)
        self._k = 0
        self._d = self._plan_step()
        self.last_start = now
        return now + self._d

    def _fit(self, k: int) -> int:
        """Most decode steps (up to ``k``) whose new blocks the free pool covers without preempting."""
        bs = self.block_size

        def need(steps: int) -> int:
            return sum(-(-(s.computed + steps) // bs) - s.held for s in self.running)

        free = self.num_free
        if need(k) <= free:
            return k
        lo, hi = 0, k  # need(lo) fits, need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _plan_step(self) -> float:
        """One step as `Scheduler.step` schedules it: allocation and publication happen now."""
        bs = self.block_size
        budget = self.max_batched
        scheduled: list[tuple[_Seq, int]] = []
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            n = min(s.prompt + s.output - s.computed, budget)
            need = -(-(s.computed + n) // bs) - s.held
            fits = True
            while need > self.num_free:
                victim = running.pop()
                self._free(victim)
                victim.computed = 0
                self.waiting.appendleft(victim)
                self.preemptions += 1
                preempted = True
                if victim is s:
                    fits = False
                    break
            if not fits:
                break
            if need > 0:
                self._pop(need)
                s.held += need
            if len(s.keys) < len(s.chain):  # a decode has published its whole prompt already
                self._publish(s, s.computed + n)
            scheduled.append((s, n))
            budget -= n
            i += 1
        waiting = self.waiting
        while may_admit(preempted, len(waiting), budget, len(running), self.max_seqs):
            s = waiting[0]
            hits, rest = self._lookup(s)
            num_hit = hits * bs
            n = min(rest, budget)
            need = -(-(num_hit + n) // bs) - hits
            hit_keys = s.chain[:hits]
            ref = self.ref
            reclaimed = 0
            for h in hit_keys:
                if ref[h] == 0:
                    reclaimed += 1
            if need > self.num_free - reclaimed:
                break
            waiting.popleft()
            running.append(s)
            for h in hit_keys:
                r = ref[h]
                if r == 0:
                    del self.lru[h]
                    self._queued -= 1
                ref[h] = r + 1
            s.keys = list(hit_keys)
            self._pop(need)
            s.held = hits + need
            s.computed = num_hit
            if s.cached < 0:
                s.cached = num_hit
                self.queries += s.prompt
                self.hits += num_hit
            self._publish(s, num_hit + n)
            scheduled.append((s, n))
            budget -= n
        prefill = decode = 0
        for s, n in scheduled:
            if is_decode(n, s.output, s.computed, s.prompt + s.output):
                decode += 1
            else:
                prefill += n
        self._scheduled = scheduled
        self._used_at_change = self.num_used
        return self.timing.step_time_s(prefill, decode, self._used_at_change / self.num_blocks)

    def finish(self, now: float) -> list[Emit]:
        """Apply the segment that ends at ``now``: tokens computed, blocks grown, first tokens, finishes."""
        emits: list[Emit] = []
        done = False
        keep = self.keep_itl
        if self._k:
            k, d, bs = self._k, self._d, self.block_size
            grow = 0
            for s in self.running:
                s.computed += k
                s.output += k
                held = -(-s.computed // bs)
                grow += held - s.held
                s.held = held
                first_gap = self._t0 + d - s.last_emit
                if s.itl is not None:
                    s.itl.append(first_gap)
                    if k > 1:
                        s.itl.extend([d] * (k - 1))
                s.gap_sum += first_gap + d * (k - 1)
                s.last_emit = now
                if s.output >= s.max_tokens:
                    done = True
            self._pop(grow)
            self.steps += k
        else:
            if self._scheduled:
                self.steps += 1
            for s, n in self._scheduled:
                s.computed += n
                if s.computed < s.prompt + s.output:
                    continue
                s.output += 1
                if s.output == 1:
                    emits.append(Emit(s.rid, True, None if s.max_tokens > 1 else "length", s.prompt,
                                      s.cached, 1, []))
                else:
                    gap = now - s.last_emit
                    s.gap_sum += gap
                    if s.itl is not None:
                        s.itl.append(gap)
                s.last_emit = now
                if s.output >= s.max_tokens:
                    done = True
            self._scheduled = []
        if done:
            alive = []
            for s in self.running:
                if s.output < s.max_tokens:
                    alive.append(s)
                    continue
                self._free(s)
                itl = s.itl if keep and s.itl is not None else (
                    [s.gap_sum / (s.output - 1)] if s.output > 1 else [])
                if s.output == 1:
                    continue  # its first-token event already carries the finish
                emits.append(Emit(s.rid, False, "length", s.prompt, s.cached, s.output, itl))
            self.running = alive
        self._used_at_change = self.num_used
        return emits
