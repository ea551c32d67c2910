"""Offline discrete-event fleet simulator: the router's policies over the sim engine model, in virtual time.

    python -m benchmarks.simulate --workload gsp --replicas 4                 # every policy, small fleet
    python -m benchmarks.simulate --workload gsp --replicas 4 --against-live  # + the same run over HTTP
    python -m benchmarks.simulate --scale --replicas 1000 --requests 20000 --policies round_robin
    python -m benchmarks.simulate --scale --engine fast --replicas 1000 --requests 1000000 --policies round_robin

Why: the live benchmark runs the real router and real sim engine servers, so it is faithful but bound to
what two cores can serve (a handful of replicas, a few hundred requests). This drives the SAME objects
without HTTP or asyncio: every replica is an `engine_server.sim.scheduler.Scheduler` (the very
continuous-batching scheduler and paged prefix cache the sim engine server steps), every decision is a
`router.policies` policy's ``choose -> on_dispatch -> on_complete`` on `ReplicaView`s built the way the
router builds them, and one event heap orders everything in virtual time:

- a replica's step: when it starts, ``Scheduler.step()`` runs (blocks allocated and published then, as in
  the engine loop); its outputs are delivered ``duration`` later, and the next step starts at once if
  work remains. Requests that arrive meanwhile wait for that next step, as in the live engine.
- a request: the client's send; the policy decides at once on the current views and the request enters
  the chosen replica's waiting queue (no network, no router CPU time).
- a load poll every ``poll_interval_s``: every replica's report (running, waiting, KV blocks) is copied
  into its view with its age, as the router's poller does; in-flight counters are always current.

``--engine fast`` swaps each replica's stepped `Scheduler` for `benchmarks.sim_fast.FastEngine` (same
batching and prefix-cache rules, decode windows advanced in one event), several times faster.

Load follows `benchmarks.loadgen` exactly (closed-loop clients pulling sessions, Poisson session starts,
or trace timestamps; turns of a session in order; ``max_requests`` and ``max_s`` bounds, here in virtual
seconds), and every request yields a `RequestRecord`, so `benchmarks.metrics.summarize_run` reads
simulated and live runs alike. See docs/simulator.md for what is and is not modelled and how well it
agrees with the live benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import math
import random
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.lib import workloads as wl
from benchmarks.lib.cli_help import DefaultsHelpFormatter
from benchmarks.lib.defaults import MODEL, PROFILE_COST_PARAMS, RESULTS_DIR
from benchmarks.lib.loadgen import LoadSpec, RequestRecord, arrival_times
from benchmarks.lib.metrics import summarize_run
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.sim_fast import ChainEncoder, Emit, FastEngine
from engine_server.backend import BackendError
from engine_server.sim.backend import SimBackend, SimConfig
from engine_server.sim.scheduler import RequestOutput, Scheduler, SchedulerConfig, SimRequest
from engine_server.sim.timing import PROFILES, TimingProfile, get_profile
from engine_server.sim.tokenizer import DEFAULT_VOCAB_SIZE, SimTokenizer, output_seed
from router.features import HashingConfig, RequestFeatures, features_from_body
from router.policies import POLICY_NAMES, create_policy
from router.policies.base import Decision, Outcome, Policy
from router.replica_view import ReplicaView

DEFAULT_POLL_S = 0.5  # config.router LoadConfig.poll_interval_s default
DEFAULT_STALE_S = 3.0  # config.router LoadConfig.stale_after_s default
# Agreement tolerance of --against-live (docs/simulator.md explains the choice).
TOL_HIT_ABS = 0.05
TOL_TTFT_REL = 0.25
TOL_THROUGHPUT_REL = 0.15

# event kinds, ordered so that simultaneous events are handled deterministically by push order
_STEP_DONE, _SEND, _SESSION, _POLL = 0, 1, 2, 3


# -- the engine side: prompts as the sim engine tokenizes them ------------------------------------------


class PromptEncoder:
    """Render a chat with the sim engine's template and tokenize it, reusing work for shared prefixes.

    Why: tokenizing is the sim engine's per-request cost (one hash per 4 characters), and workloads
    re-send long shared prefixes (group system prompts, conversation histories). The tokenizer cuts
    fixed 4-character chunks from the start, so the tokens of a message prefix cut at a multiple of 4
    characters never change when more text follows; those are cached (LRU, bounded) per message prefix.
    The result is exactly ``SimTokenizer.encode(SimBackend.render_chat(messages))`` (a test checks it).
    """

    def __init__(self, chars_per_token: int = 4, max_prefixes: int = 4096) -> None:
        self.tokenizer = SimTokenizer(chars_per_token)
        self.render = SimBackend(SimConfig(profile="instant", num_blocks=16,
                                           chars_per_token=chars_per_token)).render_chat
        self.tail = self.render([])  # what the template appends after the last message
        self.c = chars_per_token
        self.max_prefixes = max_prefixes
        self._prefixes: OrderedDict[tuple[tuple[str, str], ...], tuple[list[int], str]] = OrderedDict()
        self._chunks: dict[str, int] = {}

    def _encode(self, text: str) -> list[int]:
        chunks, encode, c = self._chunks, self.tokenizer.encode, self.c
        out = []
        for i in range(0, len(text), c):
            piece = text[i:i + c]
            t = chunks.get(piece)
            if t is None:
                t = chunks[piece] = encode(piece)[0]
                if len(chunks) > 1 << 20:  # bounded: pseudo-word text has few distinct chunks anyway
                    chunks.clear()
            out.append(t)
        return out

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], str]:
        """(prompt token ids, rendered prompt text) as the engine would see them."""
        ids: list[int] = []
        rest = ""
        key: tuple[tuple[str, str], ...] = ()
        texts: list[str] = []
        for k, m in enumerate(messages):
            key = (*key, (str(m.get("role")), str(m.get("content"))))
            cached = self._prefixes.get(key) if k < len(messages) - 1 else None
            part = self.render([m])[: -len(self.tail)] if self.tail else self.render([m])
            texts.append(part)
            if cached is not None:
                self._prefixes.move_to_end(key)
                ids, rest = cached[0].copy(), cached[1]
                continue
            s = rest + part
            cut = len(s) - len(s) % self.c
            ids.extend(self._encode(s[:cut]))
            rest = s[cut:]
            if k < len(messages) - 1:
                self._prefixes[key] = (ids.copy(), rest)
                if len(self._prefixes) > self.max_prefixes:
                    self._prefixes.popitem(last=False)
        ids.extend(self._encode(rest + self.tail))
        return ids, "".join(texts) + self.tail


class FastOutput:
    """A cheap stand-in for the engine's `OutputStream`: deterministic ids from the same greedy seed.

    Why: generated text never reaches a metric here (workloads re-send canned answers, not the engine's),
    only its KV blocks do, and those are hashed from token ids that are unique per prompt either way.
    Use ``exact_tokens=True`` to run the engine's own stream instead (about 2 us per token more).
    """

    __slots__ = ("_x",)

    def __init__(self, seed: int) -> None:
        self._x = seed & 0xFFFFFFFFFFFFFFFF

    def next_token(self) -> tuple[int, str]:
        self._x = (self._x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return (self._x >> 33) % DEFAULT_VOCAB_SIZE, ""


class ExactEngine:
    """The real `Scheduler` behind the interface `FastEngine` offers: one segment is one `step()`.

    Why: one event loop drives either engine model; this one steps per token (faithful by construction),
    the fast one jumps decode windows (`benchmarks.sim_fast`).
    """

    def __init__(self, config: SchedulerConfig, timing: TimingProfile) -> None:
        self.sched = Scheduler(config, timing)
        self.num_blocks = config.num_blocks
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.epoch = 0
        self._outputs: list[RequestOutput] = []

    @property
    def has_work(self) -> bool:
        return self.sched.has_work

    @property
    def steps(self) -> int:
        return self.sched.stats.steps

    @property
    def preemptions(self) -> int:
        return self.sched.stats.preemptions

    def load(self) -> tuple[int, int, int]:
        s = self.sched
        return s.num_running, s.num_waiting, s.kv.num_used_blocks

    def start(self, now: float) -> float:
        """Run the step now (blocks allocated and published as in the engine loop); return its end."""
        self.epoch += 1
        result = self.sched.step()
        self._outputs = result.outputs
        return now + result.duration_s

    def finish(self, now: float) -> list[RequestOutput]:
        return self._outputs

    def arrive(self, now: float) -> float | None:
        return None  # a request arriving mid-step waits for the next step


ENGINES = ("exact", "fast")


# -- the simulated fleet -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Req:
    """One dispatched request's bookkeeping on the router and client side."""

    session: int
    turn: int
    sess: wl.Session  # kept: a lazily built workload's sessions cost something to index
    features: RequestFeatures
    decision: Decision
    replica: int
    start_s: float
    prompt_tokens: int
    ttft_s: float | None = None
    last_s: float = 0.0
    itl: list[float] | None = None
    tokens_held: bool = True
    gap_sum: float = 0.0
    gaps: int = 0


@dataclass(eq=False, slots=True)
class _Replica:
    name: str
    engine: ExactEngine | FastEngine
    in_flight: int = 0
    in_flight_tokens: int = 0
    stepping: bool = False  # a step is under way (its _STEP_DONE event is in the heap)
    load: tuple[int, int, int] | None = None  # running, waiting, kv blocks used at the last poll
    load_at: float = 0.0
    served: int = 0


@dataclass
class SimRun:
    """One simulated run: the same records a live run yields, plus what the simulator itself saw."""

    policy: str
    records: list[RequestRecord]
    wall_s: float  # virtual seconds from the first send to the last completion
    per_replica: dict[str, int]
    reasons: Counter[str]
    real_s: float  # real seconds the simulation took
    cpu_s: float  # CPU seconds of this process meanwhile (real_s minus what other jobs took from it)
    stopped_by: str
    steps: int
    events: int
    preemptions: int

    def summary(self) -> dict[str, Any]:
        s = summarize_run(self.records, self.wall_s, per_replica=self.per_replica)
        s["decisions"] = dict(self.reasons)
        s["sim"] = {"real_s": round(self.real_s, 3), "cpu_s": round(self.cpu_s, 3), "steps": self.steps,
                    "events": self.events,
                    "preemptions": self.preemptions,
                    "requests_per_real_s": round(len(self.records) / self.real_s, 1) if self.real_s else math.nan,
                    "requests_per_cpu_s": round(len(self.records) / self.cpu_s, 1) if self.cpu_s else math.nan}
        return s


def simulate(workload: wl.Workload, replicas: int, policy_name: str, policy_params: dict[str, Any] | None = None,
             *, profile: str | TimingProfile | Sequence[str | TimingProfile] = "llmd-8b",
             num_blocks: int | None = None, load: LoadSpec,
             poll_interval_s: float = DEFAULT_POLL_S, stale_after_s: float = DEFAULT_STALE_S, seed: int = 1,
             hashing: HashingConfig | None = None, keep_itl: bool = True, exact_tokens: bool = False,
             max_real_s: float = 3600.0, policy: Policy | None = None, engine: str = "exact") -> SimRun:
    """Run ``workload`` on ``replicas`` simulated engines behind policy ``policy_name``, in virtual time.

    ``profile`` is one timing profile (name or object) for every replica, or one per replica.
    ``load`` has `benchmarks.loadgen` semantics; its ``max_s`` bounds virtual time (no request starts
    later) and ``max_real_s`` bounds the real time spent (then it stops like a deadline). ``seed`` seeds
    the policy's tie-breaks; Poisson arrivals use ``load.seed`` as the load generator does.
    ``keep_itl=False`` keeps only each request's mean gap (memory for million-request runs).
    ``engine="fast"`` replaces the stepped `Scheduler` with `benchmarks.sim_fast.FastEngine` (decode
    windows in one event; docs/simulator.md has how well the two agree).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    fast = engine == "fast"
    t_real, t_cpu = time.perf_counter(), time.process_time()
    if isinstance(profile, (str, TimingProfile)):
        profile = [profile] * replicas
    if len(profile) != replicas:
        raise ValueError(f"{len(profile)} profiles for {replicas} replicas")
    profs = [get_profile(p) if isinstance(p, str) else p for p in profile]
    hashing = hashing or HashingConfig()
    if policy is None:
        policy = create_policy(policy_name, seed=seed, **(policy_params or {}))
    cfgs = [SchedulerConfig.from_profile(p, num_blocks=num_blocks) for p in profs]
    reps = [_Replica(f"r{i}", FastEngine(c, p, keep_itl) if fast else ExactEngine(c, p))
            for i, (c, p) in enumerate(zip(cfgs, profs, strict=True))]
    for r in reps:
        policy.on_replica_added(r.name)
    by_name = {r.name: i for i, r in enumerate(reps)}
    url = "http://sim"
    views: list[ReplicaView] = [_view(r, url, 0.0, stale_after_s) for r in reps]
    encoder = PromptEncoder() if not fast else None
    chains = _chain_encoder() if fast else None
    sessions = workload.sessions
    records: list[RequestRecord] = []
    reasons: Counter[str] = Counter()
    inflight: dict[str, _Req] = {}
    # (time, when the stepped engine would have pushed it, push counter, kind, payload): simultaneous
    # events go in push order; a fast engine's window end counts as pushed when its last step starts.
    heap: list[tuple[float, float, int, int, Any]] = []
    now_s = 0.0
    counter = 0
    left = load.max_requests
    stopped_by = "done"
    last_t = 0.0
    events = 0

    def push(t: float, kind: int, payload: Any, pushed_at: float | None = None) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(heap, (t, now_s if pushed_at is None else pushed_at, counter, kind, payload))

    def take(now: float) -> bool:
        """loadgen's budget: no request starts past the count or the (virtual) deadline."""
        nonlocal left, stopped_by
        if left <= 0:
            stopped_by = "count"
            return False
        if now > load.max_s:
            stopped_by = "time"
            return False
        left -= 1
        return True

    def refresh(i: int, now: float) -> None:
        views[i] = _view(reps[i], url, now, stale_after_s)

    def send(s_idx: int, turn: int, now: float, session: wl.Session | None = None) -> None:
        session = session or sessions[s_idx]
        if not take(now):
            return
        req = session.turns[turn]
        rid = f"{session.id}-{turn}"
        features = features_from_body(req.body(MODEL), "chat", rid, hashing)
        decision = policy.choose(features, views)
        i = by_name[decision.replica]
        rep = reps[i]
        policy.on_dispatch(features, decision)
        reasons[decision.reason] += 1
        eng = rep.engine
        rep.in_flight += 1
        rep.in_flight_tokens += features.token_estimate
        try:
            if chains is not None:
                num_prompt, chain = chains.encode(req.messages)
                eng.add(rid, num_prompt, chain, req.max_tokens)  # type: ignore[union-attr]
            else:
                assert encoder is not None
                prompt_ids, text = encoder.encode(req.messages)
                num_prompt = len(prompt_ids)
                out_seed = output_seed(0, rid, text, None, 0.0)
                stream = SimTokenizer().output_stream(out_seed) if exact_tokens else FastOutput(out_seed)
                eng.sched.add(SimRequest(rid, prompt_ids, req.max_tokens, stream))  # type: ignore
        except BackendError as exc:  # e.g. context length exceeded: the engine answers before any output
            rep.in_flight -= 1
            rep.in_flight_tokens -= features.token_estimate
            policy.on_complete(features, decision, Outcome(ok=False, status=exc.status, error_kind="status"))
            records.append(RequestRecord(session.id, turn, exc.status, now, 0.0, prompt_tokens=0,
                                         replica=rep.name, error=str(exc)))
            refresh(i, now)
            push(now, _SEND, (s_idx, turn + 1))  # loadgen goes on with the next turn
            return
        st = _Req(s_idx, turn, session, features, decision, i, now, num_prompt, last_s=now,
                  itl=[] if keep_itl and not fast else None)
        inflight[rid] = st
        rep.served += 1
        refresh(i, now)
        if not rep.stepping:
            start_step(i, now)
        elif (end := eng.arrive(now)) is not None:  # a fast engine's decode window ends early
            push(end, _STEP_DONE, (i, eng.epoch), getattr(eng, "last_start", now))

    def start_step(i: int, now: float) -> None:
        eng = reps[i].engine
        end = eng.start(now)
        reps[i].stepping = True
        push(end, _STEP_DONE, (i, eng.epoch), getattr(eng, "last_start", now))

    def deliver(i: int, outputs: Sequence[RequestOutput | Emit], now: float,
                follow: list[tuple[int, int, wl.Session]]) -> None:
        rep = reps[i]
        changed = False
        for out in outputs:
            st = inflight.get(out.request_id)
            if st is None:
                continue
            if out.first:
                st.ttft_s = now - st.start_s
                if st.tokens_held:  # the router drops the prompt from in-flight tokens at the first byte
                    st.tokens_held = False
                    rep.in_flight_tokens -= st.features.token_estimate
                    changed = True
            elif st.itl is not None:
                st.itl.append(now - st.last_s)
            elif not fast:
                st.gap_sum += now - st.last_s
                st.gaps += 1
            st.last_s = now
            if out.finish_reason is None:
                continue
            del inflight[out.request_id]
            rep.in_flight -= 1
            changed = True
            session = st.sess
            if fast:
                itl = out.itl  # type: ignore[union-attr]
            else:
                itl = st.itl if st.itl is not None else [st.gap_sum / st.gaps] if st.gaps else []
            rec = RequestRecord(session.id, st.turn, 200, st.start_s, now - st.start_s, st.ttft_s, itl,
                                out.prompt_tokens,
                                out.completion_tokens, out.cached_tokens, rep.name)
            records.append(rec)
            policy.on_complete(st.features, st.decision, Outcome(
                ok=True, status=200, ttft_s=st.ttft_s, prompt_tokens=out.prompt_tokens,
                cached_tokens=out.cached_tokens, completion_tokens=out.completion_tokens, e2e_s=now - st.start_s))
            follow.append((st.session, st.turn + 1, session))
        if changed:
            refresh(i, now)

    def poll(now: float) -> None:
        for i, rep in enumerate(reps):
            rep.load = rep.engine.load()
            rep.load_at = now
            refresh(i, now)

    def start_session(s_idx: int, now: float) -> None:
        push(now, _SEND, (s_idx, 0))

    def proceed(s_idx: int, turn: int, now: float, session: wl.Session | None = None) -> None:
        """A session's next turn, or (closed loop) the client's next session, as loadgen's clients do."""
        session = session or sessions[s_idx]
        if turn < len(session.turns):
            send(s_idx, turn, now, session)
        elif closed:
            if left <= 0 or now > load.max_s:
                take(now)  # records why the client stopped
                return
            nxt = next(next_session, None)
            if nxt is not None:
                send(nxt, 0, now)

    # -- load: loadgen's three modes -----------------------------------------------------------------
    next_session: Iterator[int] = iter(range(len(sessions)))
    closed = load.mode == "concurrency"
    poll(0.0)
    push(poll_interval_s, _POLL, None)
    if closed:
        for _ in range(max(1, load.concurrency or 1)):
            s_idx = next(next_session, None)
            if s_idx is None:
                break
            start_session(s_idx, 0.0)
    else:
        for s_idx, at in enumerate(arrival_times(workload, load)):
            if at > load.max_s:
                stopped_by = "time"
                break
            push(at, _SESSION, s_idx)

    pending_work = 0  # sessions still to be sent or running, so polls stop when nothing is left
    deadline = t_real + max_real_s
    max_events = 64 * (min(load.max_requests, workload.num_requests) + 16) * (1 + 64) + 10_000_000
    # The run allocates millions of small objects (records, heap entries) and keeps them; the cyclic
    # collector would rescan them again and again for nothing, so it is paused for the loop.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while heap and events < max_events:
            t, _, _, kind, payload = heapq.heappop(heap)
            now_s = t
            events += 1
            if kind == _STEP_DONE:
                i, epoch = payload
                rep = reps[i]
                if epoch != rep.engine.epoch:
                    continue  # a decode window that an arrival cut short
                follow: list[tuple[int, int, wl.Session]] = []
                deliver(i, rep.engine.finish(t), t, follow)
                rep.stepping = False
                if rep.engine.has_work:
                    start_step(i, t)
                last_t = t
                for s_idx, turn, session in follow:
                    proceed(s_idx, turn, t, session)
            elif kind == _SEND:
                proceed(*payload, t)
            elif kind == _SESSION:
                if left > 0:
                    send(payload, 0, t)
                else:
                    stopped_by = "count"
            else:  # _POLL: keep polling while anything can still happen
                poll(t)
                pending_work = len(heap)
                if pending_work or inflight:
                    push(t + poll_interval_s, _POLL, None)
            if events & 0x3FF == 1 and time.perf_counter() > deadline:
                stopped_by = "time"
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    if left <= 0 and stopped_by == "done" and len(records) < workload.num_requests:
        stopped_by = "count"
    records.sort(key=lambda r: r.start_s)
    wall = max((r.start_s + r.e2e_s for r in records), default=last_t)
    return SimRun(
        policy=policy_name, records=records, wall_s=wall,
        per_replica={r.name: r.served for r in reps},
        reasons=reasons, real_s=time.perf_counter() - t_real, cpu_s=time.process_time() - t_cpu,
        stopped_by=stopped_by,
        steps=sum(r.engine.steps for r in reps), events=events,
        preemptions=sum(r.engine.preemptions for r in reps))


def _view(rep: _Replica, url: str, now: float, stale_after_s: float) -> ReplicaView:
    """The view `ReplicaState.view` would build: router counters always, the engine report while fresh.

    Views are rebuilt only when their replica changes (dispatch, first token, completion, poll); the
    age is the one at rebuild time. With polls more often than ``stale_after_s`` (the default) a report
    is never stale, so reading the age a little early never changes a fresh/stale verdict.
    """
    kv = rep.engine
    load = rep.load
    age = now - rep.load_at if load is not None else None
    if load is None or age is None or age > stale_after_s:
        return ReplicaView(rep.name, url, 1.0, rep.in_flight, rep.in_flight_tokens, 0, 0, 0, kv.num_blocks,
                           kv.block_size, None, max_num_seqs=kv.max_num_seqs)
    return ReplicaView(rep.name, url, 1.0, rep.in_flight, rep.in_flight_tokens, load[0], load[1], load[2],
                       kv.num_blocks, kv.block_size, max(0.0, age), max_num_seqs=kv.max_num_seqs)


_CHAINS: dict[int, ChainEncoder] = {}


def _chain_encoder() -> ChainEncoder:
    """One `ChainEncoder` per process, so runs of several policies over one workload hash it once."""
    return _CHAINS.setdefault(0, ChainEncoder())


# -- a workload for fleets of a thousand replicas ----------------------------------------------------------


class _LazySessions(Sequence[wl.Session]):
    """gsp-shaped sessions built on demand, so a million-request workload costs no memory up front.

    Text comes from slices of one seeded pseudo-word pool instead of per-request generation: the same
    shape as `workloads.gsp` (a group system prompt, then a unique question), built in microseconds.
    """

    def __init__(self, requests: int, groups: int, system_tokens: int, question_tokens: int,
                 output_tokens: int, seed: int) -> None:
        rng = random.Random(seed)
        self.n, self.output_tokens = requests, output_tokens
        self.pool = wl.text_of(rng, 1 << 18)  # 1 MiB of pseudo-words
        span = len(self.pool) - (system_tokens + question_tokens) * wl.CHARS_PER_TOKEN
        self.systems = [f"Group {g}. " + self._slice(rng.randrange(span), system_tokens) for g in range(groups)]
        self.group_of = [rng.randrange(groups) for _ in range(requests)]
        self.offset = [rng.randrange(span) for _ in range(requests)]
        self.question_tokens = question_tokens

    def _slice(self, start: int, tokens: int) -> str:
        return self.pool[start:start + tokens * wl.CHARS_PER_TOKEN]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> wl.Session:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = self.group_of[i]
        question = f"Question {i}: " + self._slice(self.offset[i], self.question_tokens)
        req = wl.Request(({"role": "system", "content": self.systems[g]},
                          {"role": "user", "content": question}), self.output_tokens)
        return wl.Session(id=f"s{i}", turns=(req,), group=f"g{g}")

    def __iter__(self) -> Iterator[wl.Session]:
        return (self[i] for i in range(self.n))


def scale_workload(requests: int, replicas: int, *, seed: int = 0, system_tokens: int = 512,
                   question_tokens: int = 64, output_tokens: int = 32,
                   groups_per_replica: int = 16) -> wl.Workload:
    """gsp at fleet scale: ``groups_per_replica x replicas`` groups, one request per session, lazily built."""
    groups = max(1, min(requests, groups_per_replica * replicas))
    sessions = _LazySessions(requests, groups, system_tokens, question_tokens, output_tokens, seed)
    return wl.Workload("gsp-scale", sessions, {  # type: ignore[arg-type]
        "requests": requests, "groups": groups, "system_tokens": system_tokens,
        "question_tokens": question_tokens, "output_tokens": output_tokens, "seed": seed})


# -- the command line ---------------------------------------------------------------------------------


def policy_params(name: str, profile: str) -> dict[str, Any]:
    """What the live benchmarks run: `cost` with the profile's time constants, the others with defaults."""
    return dict(PROFILE_COST_PARAMS.get(profile, {})) if name == "cost" else {}


def build_workload(args: argparse.Namespace) -> wl.Workload:
    if args.scale:
        return scale_workload(args.requests or 100_000, args.replicas, seed=args.seed)
    built = wl.build(args.workload, seed=args.seed, full=args.full, trace_path=args.trace)
    if len(built) > 1:  # prefix-sweep: one ratio per run keeps the table readable
        built = [w for w in built if w.params.get("ratio") == args.ratio] or built[:1]
    return built[0]


def load_spec(args: argparse.Namespace, workload: wl.Workload) -> LoadSpec:
    max_requests = args.requests or workload.num_requests
    if args.rate is not None:
        return LoadSpec(rate=args.rate, max_requests=max_requests, max_s=args.max_s, seed=args.seed)
    if args.workload == "trace" and args.concurrency is None and not args.scale:
        return LoadSpec(rate=0, max_requests=max_requests, max_s=args.max_s, seed=args.seed)
    conc = args.concurrency or (4 * args.replicas if args.scale else 16)
    return LoadSpec(concurrency=conc, max_requests=max_requests, max_s=args.max_s, seed=args.seed)


def row_of(label: str, s: dict[str, Any]) -> list[Any]:
    return [label, s["requests"], s["failed"], s["hit_rate"], s["ttft_ms"]["p50"], s["ttft_ms"]["p90"],
            s["e2e_ms"]["p50"], s["req_per_s"], s["max_over_mean"], s["wall_s"]]


HEADERS = ["run", "requests", "failed", "hit", "ttft p50 ms", "ttft p90 ms", "e2e p50 ms", "req/s", "max/mean",
           "wall s"]


def compare(sim: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Sim vs live on the agreement metrics, each with its error and verdict against the tolerance."""
    def rel(a: float, b: float) -> float:
        return (a - b) / b if b else math.nan

    out: dict[str, Any] = {}
    hit_err = sim["hit_rate"] - live["hit_rate"]
    out["hit_rate"] = {"sim": sim["hit_rate"], "live": live["hit_rate"], "abs_err": round(hit_err, 4),
                       "tolerance": f"+-{TOL_HIT_ABS} abs", "pass": abs(hit_err) <= TOL_HIT_ABS}
    for q in ("p50", "p90"):
        e = rel(sim["ttft_ms"][q], live["ttft_ms"][q])
        out[f"ttft_{q}_ms"] = {"sim": sim["ttft_ms"][q], "live": live["ttft_ms"][q], "rel_err": round(e, 4),
                               "tolerance": f"+-{TOL_TTFT_REL:.0%}", "pass": abs(e) <= TOL_TTFT_REL}
    e = rel(sim["req_per_s"], live["req_per_s"])
    out["req_per_s"] = {"sim": sim["req_per_s"], "live": live["req_per_s"], "rel_err": round(e, 4),
                        "tolerance": f"+-{TOL_THROUGHPUT_REL:.0%}", "pass": abs(e) <= TOL_THROUGHPUT_REL}
    out["max_over_mean"] = {"sim": sim["max_over_mean"], "live": live["max_over_mean"],
                            "abs_err": round(sim["max_over_mean"] - live["max_over_mean"], 3),
                            "tolerance": "reported only", "pass": True}
    return out


async def run_live(workload: wl.Workload, policy: str, params: dict[str, Any], args: argparse.Namespace,
                   spec: LoadSpec, kv_blocks: int) -> dict[str, Any]:
    """The same workload over HTTP: 4 sim engine subprocesses (time scale 1) and the router."""
    from benchmarks.lib.fleet import EngineSpec, Fleet, RouterSpec
    from benchmarks.lib.loadgen import run_workload

    engine = EngineSpec(profile=args.profile, num_blocks=kv_blocks)
    router = RouterSpec(policy=policy, params=params, load_poll_s=args.poll_interval_s)
    async with Fleet(args.replicas, engine, router) as fleet:
        assert fleet.router_url is not None
        res = await run_workload(fleet.router_url, workload, spec, progress=False)
    served = Counter(r.replica for r in res.records if r.ok and r.replica)
    per_replica = {f"r{i}": served.get(f"r{i}", 0) for i in range(args.replicas)}  # zeros count in max/mean
    return summarize_run(res.records, res.wall_s, per_replica=per_replica)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.simulate",
        description="Offline discrete-event fleet simulator: the router's policies on the sim engine's "
                    "scheduler and prefix cache, in virtual time (no HTTP). Prints one row per policy and "
                    "writes benchmarks/results/simulate-<workload>.json.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--workload", choices=wl.NAMES, default="gsp",
                   help="workload generator from benchmarks.workloads (ignored with --scale)")
    p.add_argument("--trace", type=Path, default=None, help="JSONL trace for --workload trace (default: sample)")
    p.add_argument("--ratio", type=float, default=0.5, help="shared-prefix ratio for --workload prefix-sweep")
    p.add_argument("--full", action="store_true", help="the workload's literature-sized variant")
    p.add_argument("--replicas", type=int, default=4, help="simulated engine replicas")
    p.add_argument("--policies", default=",".join(POLICY_NAMES),
                   help="comma-separated router policies; cost gets the profile's time constants")
    p.add_argument("--profile", choices=sorted(PROFILES), default="llmd-8b", help="sim engine timing profile")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks per replica (default: workloads.kv_blocks_per_replica, i.e. 1.3x the "
                        "workload's footprint over the fleet; with --scale the profile's own)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed-loop clients, each running sessions back to back (default 16; with "
                           "--scale 4 per replica)")
    load.add_argument("--rate", type=float, default=None,
                      help="Poisson session arrivals per (virtual) second; 0 replays trace timestamps")
    p.add_argument("--requests", type=int, default=None,
                   help="stop after this many requests (default: the whole workload; with --scale, also "
                        "the generated workload's size, 100000)")
    p.add_argument("--max-s", type=float, default=3600.0, help="no request starts after this many virtual s")
    p.add_argument("--seed", type=int, default=1, help="workload, arrivals and policy tie-break seed")
    p.add_argument("--scale", action="store_true",
                   help="generate a fleet-sized gsp workload (16 groups per replica, 512-token system "
                        "prompts, 64-token questions, 32 output tokens) and skip per-token gaps")
    p.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_S,
                   help="how often the router reads each replica's /load (views carry its age)")
    p.add_argument("--stale-after-s", type=float, default=DEFAULT_STALE_S,
                   help="load reports older than this read as missing, as in the router")
    p.add_argument("--engine", choices=ENGINES, default="exact",
                   help="exact: step the sim engine's Scheduler per token; fast: benchmarks.sim_fast's "
                        "model (same batching and prefix cache, decode windows in one event; ~10x+ faster)")
    p.add_argument("--exact-tokens", action="store_true",
                   help="generate output tokens with the engine's own stream (slower; same metrics)")
    p.add_argument("--against-live", action="store_true",
                   help=f"also run the same workload live ({'{replicas}'} sim engine subprocesses + router, "
                        "time scale 1) and print sim vs live with PASS/FAIL against the tolerance")
    p.add_argument("--profile-cpu", action="store_true", help="run under cProfile and print the top functions")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in policies:
        create_policy(name)  # fail fast on a typo
    t0 = time.perf_counter()
    workload = build_workload(args)
    build_s = time.perf_counter() - t0
    if args.kv_blocks is not None:
        kv = args.kv_blocks
    elif args.scale:
        kv = get_profile(args.profile).num_blocks
    else:
        kv = wl.kv_blocks_per_replica(workload, args.replicas)
    spec = load_spec(args, workload)
    print(f"{workload.describe()}\n{args.replicas} replicas, {args.engine} engine, profile {args.profile}, "
          f"{kv} KV blocks each, "
          f"load {spec.label()}, workload built in {build_s:.1f} s", flush=True)
    out: dict[str, Any] = {"machine": machine_info(), "workload": workload.name, "params": workload.params,
                           "replicas": args.replicas, "engine": args.engine, "profile": args.profile,
                           "kv_blocks": kv,
                           "load": spec.label(), "poll_interval_s": args.poll_interval_s,
                           "tolerance": {"hit_abs": TOL_HIT_ABS, "ttft_rel": TOL_TTFT_REL,
                                         "req_per_s_rel": TOL_THROUGHPUT_REL},
                           "runs": {}}
    if not args.scale:
        out["oracle_hit_rate"] = round(wl.oracle(workload, kv * args.replicas).hit_rate, 4)
    rows = []
    perf_rows = []
    for name in policies:
        params = policy_params(name, args.profile)
        kwargs: dict[str, Any] = dict(profile=args.profile, num_blocks=kv, load=spec,
                                      poll_interval_s=args.poll_interval_s, stale_after_s=args.stale_after_s,
                                      seed=args.seed, keep_itl=not args.scale, exact_tokens=args.exact_tokens,
                                      engine=args.engine)
        if args.profile_cpu:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            run = prof.runcall(simulate, workload, args.replicas, name, params, **kwargs)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            run = simulate(workload, args.replicas, name, params, **kwargs)
        s = run.summary()
        entry: dict[str, Any] = {"params": params, "sim": s, "stopped_by": run.stopped_by}
        rows.append(row_of(f"{name} sim", s))
        perf_rows.append([name, len(run.records), round(run.real_s, 2), s["sim"]["requests_per_real_s"],
                          s["sim"]["requests_per_cpu_s"], run.steps, run.events, round(run.wall_s, 1)])
        if args.against_live:
            live = asyncio.run(run_live(workload, name, params, args, spec, kv))
            entry["live"] = live
            entry["agreement"] = compare(s, live)
            rows.append(row_of(f"{name} live", live))
        out["runs"][name] = entry
        print(format_table(HEADERS, rows[-2 if args.against_live else -1:]), flush=True)
    print()
    print(format_table(HEADERS, rows))
    if "oracle_hit_rate" in out:
        print(f"pooled-cache bound (workloads.oracle, {kv * args.replicas} blocks): {out['oracle_hit_rate']}")
    print()
    print(format_table(["policy", "requests", "real s", "req/real s", "req/cpu s", "engine steps", "events",
                        "virtual s"],
                       perf_rows))
    failed = 0
    if args.against_live:
        print(f"\nsim vs live (tolerance: hit rate +-{TOL_HIT_ABS:.2f} abs, TTFT p50/p90 +-{TOL_TTFT_REL:.0%}, "
              f"req/s +-{TOL_THROUGHPUT_REL:.0%})")
        arows = []
        for name, entry in out["runs"].items():
            for metric, a in entry["agreement"].items():
                err = a.get("abs_err", a.get("rel_err"))
                verdict = "PASS" if a["pass"] else "FAIL"
                failed += not a["pass"]
                arows.append([name, metric, a["sim"], a["live"], err, a["tolerance"],
                              verdict if a["tolerance"] != "reported only" else "-"])
        print(format_table(["policy", "metric", "sim", "live", "error", "tolerance", "verdict"], arows))
    out["machine"]["loadavg_1m_at_end"] = round(__import__("os").getloadavg()[0], 2)
    suffix = "-fast" if args.engine == "fast" else ""
    path = args.out or RESULTS_DIR / f"simulate-{workload.name}{suffix}.json"
    write_json(path, out)
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
