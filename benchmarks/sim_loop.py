"""The fleet simulator's event loop: the router's own routing step over simulated engines, in virtual time.

Every replica is a real `router.replicas.state.ReplicaState` (in-flight counters kept by real `Lease`s,
load reports stored as real `LoadSnapshot`s, views built by its own ``view``), every decision goes
through `router.routing.RoutingCore` exactly as the live dispatcher's does, and every engine is a sim
engine model (`benchmarks.sim_engines`). One event heap orders everything in virtual time:

- a replica's step: when it starts, the engine schedules it (blocks allocated and published then, as in
  the engine loop); its outputs are delivered ``duration`` later, and the next step starts at once if
  work remains. Requests that arrive meanwhile wait for that next step, as in the live engine.
- a request: the client's send; the policy decides at once on the current views and the request enters
  the chosen replica's waiting queue (no network, no router CPU time).
- a load poll every ``poll_interval_s``: every replica's report (running, waiting, KV blocks) becomes its
  `LoadSnapshot`, as the router's poller does; in-flight counters are always current.

Views are rebuilt only when their replica changes (dispatch, first token, completion, poll), with the age
at rebuild time; with polls more often than ``stale_after_s`` (the defaults) a report is never stale, so
reading the age a little early never changes a fresh/stale verdict. That is what keeps a decision over a
thousand replicas from building a thousand views. A change only notes its time (`_Views`); the view is
built when a policy next reads it, as of that time: every change of a replica's state is noted, so the
state then is the state at the change, and a replica changes about three times per request while a
policy reads one (`round_robin`) to about ten (`cost`) views per decision.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.lib import workloads as wl
from benchmarks.lib.defaults import MODEL
from benchmarks.lib.loadgen import LoadSpec, RequestRecord, arrival_times
from benchmarks.lib.metrics import summarize_run
from benchmarks.sim_engines import ENGINES, FastOutput, PromptEncoder, make_engine, shared_chain_encoder
from config.router import LoadSettings
from engine_server.backend import BackendError
from engine_server.sim.scheduler import SchedulerConfig, SimRequest
from engine_server.sim.timing import TimingProfile, get_profile
from engine_server.sim.tokenizer import SimTokenizer, output_seed
from router.features import HashingConfig, PrefixChains, RequestFeatures, features_from_body
from router.policies import create_policy
from router.policies.base import Outcome, Policy
from router.replica_view import ReplicaView
from router.replicas.state import Lease, LoadSnapshot, ReplicaState
from router.routing import Route, RoutingCore

_LOAD = LoadSettings()
DEFAULT_POLL_S = _LOAD.poll_interval_s  # the router's own defaults (`config.router.LoadSettings`)
DEFAULT_STALE_S = _LOAD.stale_after_s
URL = "http://sim"

# event kinds, ordered so that simultaneous events are handled deterministically by push order
_STEP_DONE, _SEND, _SESSION, _POLL = 0, 1, 2, 3


@dataclass(eq=False, slots=True)
class _Req:
    """One dispatched request's bookkeeping on the router and client side."""

    session: int
    turn: int
    sess: wl.Session  # kept: a lazily built workload's sessions cost something to index
    features: RequestFeatures
    route: Route
    lease: Lease
    replica: int
    start_s: float
    ttft_s: float | None = None
    last_s: float = 0.0
    itl: list[float] | None = None
    gap_sum: float = 0.0
    gaps: int = 0


class _Views(Sequence[ReplicaView]):
    """The replicas' views as the policy reads them: each as of its replica's last change, built on the
    first read after that change (`ReplicaState.view` at the change's time). The same views an eager
    rebuild at each change gives: the loop notes every change of a replica's counters and reports, and
    the simulator records no health failures, so health never moves with time alone between the two."""

    __slots__ = ("_states", "_stale", "_views", "_changed")

    def __init__(self, states: list[ReplicaState], stale_after_s: float) -> None:
        self._states, self._stale = states, stale_after_s
        self._views = [r.view(0.0, stale_after_s) for r in states]
        self._changed: list[float | None] = [None] * len(states)  # time of a change not built yet

    def changed(self, i: int, now: float) -> None:
        self._changed[i] = now

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, i: int) -> ReplicaView:  # type: ignore[override]
        now = self._changed[i]
        if now is not None:
            self._views[i] = self._states[i].view(now, self._stale)
            self._changed[i] = None
        return self._views[i]

    def __iter__(self) -> Iterator[ReplicaView]:
        for i in range(len(self._views)):
            yield self[i]


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
             max_real_s: float = 3600.0, policy: Policy | None = None, engine: str = "exact",
             router_processes: int = 1, kv_events: bool = False, spread: str = "random") -> SimRun:
    """Run ``workload`` on ``replicas`` simulated engines behind policy ``policy_name``, in virtual time.

    ``profile`` is one timing profile (name or object) for every replica, or one per replica.
    ``load`` has `benchmarks.lib.loadgen` semantics; its ``max_s`` bounds virtual time (no request starts
    later) and ``max_real_s`` bounds the real time spent (then it stops like a deadline). ``seed`` seeds
    the policy's tie-breaks; Poisson arrivals use ``load.seed`` as the load generator does.
    ``keep_itl=False`` keeps only each request's mean gap (memory for million-request runs).
    ``engine="fast"`` replaces the stepped `Scheduler` with `engine_server.sim.fast.FastEngine` (decode
    windows in one event; docs/simulator.md has how well the two agree).
    ``router_processes`` > 1 or ``kv_events`` route through `benchmarks.sim_processes.RouterProcesses`
    (K independent policies, requests spread over them by ``spread``; the engines' KV events priced).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    started = time.perf_counter(), time.process_time()
    if isinstance(profile, (str, TimingProfile)):
        profile = [profile] * replicas
    if len(profile) != replicas:
        raise ValueError(f"{len(profile)} profiles for {replicas} replicas")
    profs = [get_profile(p) if isinstance(p, str) else p for p in profile]
    if policy is None:
        policy = create_policy(policy_name, seed=seed, **(policy_params or {}))
    sim = _Sim(workload, profs, policy, num_blocks=num_blocks, load=load, poll_interval_s=poll_interval_s,
               stale_after_s=stale_after_s, hashing=hashing or HashingConfig(), keep_itl=keep_itl,
               exact_tokens=exact_tokens, engine=engine)
    if router_processes != 1 or kv_events:
        from benchmarks.sim_processes import RouterProcesses

        sim.model = sim.core = RouterProcesses(  # type: ignore[assignment]
            sim.states, sim.engines, policy_name, policy_params, processes=router_processes, seed=seed,
            stale_after_s=stale_after_s, kv_events=kv_events, spread=spread,
            policies=[policy] if router_processes == 1 else None, clock=lambda: sim.now)
    return sim.run(policy_name, max_real_s, started)


class _Sim:
    """One run's state; `run` is the event loop, the other methods are what one event does."""

    def __init__(self, workload: wl.Workload, profs: list[TimingProfile], policy: Policy, *,
                 num_blocks: int | None, load: LoadSpec, poll_interval_s: float, stale_after_s: float,
                 hashing: HashingConfig, keep_itl: bool, exact_tokens: bool, engine: str) -> None:
        self.workload, self.load, self.hashing = workload, load, hashing
        self.poll_interval_s, self.stale_after_s = poll_interval_s, stale_after_s
        self.keep_itl, self.exact_tokens = keep_itl, exact_tokens
        self.fast = engine == "fast"
        self.core = RoutingCore(policy, stale_after_s)
        self.model: Any = None  # K router processes / KV events (`benchmarks.sim_processes`), else None
        cfgs = [SchedulerConfig.from_profile(p, num_blocks=num_blocks) for p in profs]
        self.engines = [make_engine(engine, c, p, keep_itl) for c, p in zip(cfgs, profs, strict=True)]
        self.states = [ReplicaState.create(f"r{i}", URL) for i in range(len(profs))]
        self.index = {r.name: i for i, r in enumerate(self.states)}
        self.lookup = {r.name: r for r in self.states}
        for r in self.states:
            policy.on_replica_added(r.name)
        self.views = _Views(self.states, stale_after_s)
        self.stepping = [False] * len(profs)  # a step is under way (its _STEP_DONE event is in the heap)
        self.served = [0] * len(profs)
        self.encoder = PromptEncoder() if not self.fast else None
        self.chains = shared_chain_encoder() if self.fast else None
        self.prefix_chains = PrefixChains()  # the router's chains of shared prefixes, hashed once
        self.sessions = workload.sessions
        self.num_requests = workload.num_requests  # once: a lazily built workload builds sessions to count
        self.records: list[RequestRecord] = []
        self.reasons: Counter[str] = Counter()
        self.inflight: dict[str, _Req] = {}
        # (time, when the stepped engine would have pushed it, push counter, kind, payload): simultaneous
        # events go in push order; a fast engine's window end counts as pushed when its last step starts.
        self.heap: list[tuple[float, float, int, int, Any]] = []
        self.now = 0.0
        self.counter = 0
        self.left = load.max_requests
        self.stopped_by = "done"
        self.closed = load.mode == "concurrency"
        self.next_session: Iterator[int] = iter(range(len(self.sessions)))

    # -- events ------------------------------------------------------------------------------------

    def push(self, t: float, kind: int, payload: Any, pushed_at: float | None = None) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (t, self.now if pushed_at is None else pushed_at, self.counter, kind, payload))

    def take(self, now: float) -> bool:
        """loadgen's budget: no request starts past the count or the (virtual) deadline."""
        if self.left <= 0:
            self.stopped_by = "count"
            return False
        if now > self.load.max_s:
            self.stopped_by = "time"
            return False
        self.left -= 1
        return True

    def refresh(self, i: int, now: float) -> None:
        self.views.changed(i, now)

    def send(self, s_idx: int, turn: int, now: float, session: wl.Session | None = None) -> None:
        session = session or self.sessions[s_idx]
        if not self.take(now):
            return
        req = session.turns[turn]
        rid = f"{session.id}-{turn}"
        features = features_from_body(req.body(MODEL), "chat", rid, self.hashing, prefix_chains=self.prefix_chains)
        if self.model is not None:
            features = self.model.features(features, req.messages)
        route = self.core.choose(features, self.states, views=self.views, lookup=self.lookup)
        self.reasons[route.decision.reason] += 1
        lease = self.core.dispatch(route, features, now)
        i = self.index[route.replica.name]
        eng = self.engines[i]
        try:
            if self.chains is not None:
                num_prompt, chain = self.chains.encode(req.messages)
                eng.add(rid, num_prompt, chain, req.max_tokens)  # type: ignore[union-attr]
            else:
                assert self.encoder is not None
                prompt_ids, text = self.encoder.encode(req.messages)
                out_seed = output_seed(0, rid, text, None, 0.0)
                stream = SimTokenizer().output_stream(out_seed) if self.exact_tokens else FastOutput(out_seed)
                eng.sched.add(SimRequest(rid, prompt_ids, req.max_tokens, stream))  # type: ignore[union-attr]
        except BackendError as exc:  # e.g. context length exceeded: the engine answers before any output
            self.core.complete(route, lease, features, Outcome(ok=False, status=exc.status, error_kind="status"),
                               now=now)
            self.records.append(RequestRecord(session.id, turn, exc.status, now, 0.0, prompt_tokens=0,
                                              replica=route.replica.name, error=str(exc)))
            self.refresh(i, now)
            self.push(now, _SEND, (s_idx, turn + 1))  # loadgen goes on with the next turn
            return
        self.inflight[rid] = _Req(s_idx, turn, session, features, route, lease, i, now, last_s=now,
                                  itl=[] if self.keep_itl and not self.fast else None)
        self.served[i] += 1
        self.refresh(i, now)
        if not self.stepping[i]:
            self.start_step(i, now)
        elif (end := eng.arrive(now)) is not None:  # a fast engine's decode window ends early
            self.push(end, _STEP_DONE, (i, eng.epoch), eng.last_start)

    def start_step(self, i: int, now: float) -> None:
        eng = self.engines[i]
        end = eng.start(now)
        self.stepping[i] = True
        self.push(end, _STEP_DONE, (i, eng.epoch), eng.last_start)

    def deliver(self, i: int, outputs: Sequence[Any], now: float, follow: list[tuple[int, int, wl.Session]]) -> None:
        """A step's outputs reach the router: first tokens drop prompts from in-flight tokens, finishes
        complete their route (health, usage, policy feedback, lease) and let their client go on."""
        changed = False
        fast, inflight = self.fast, self.inflight
        for out in outputs:
            st = inflight.get(out.request_id)
            if st is None:
                continue
            if out.first:
                st.ttft_s = now - st.start_s
                st.lease.first_token()  # the router drops the prompt from in-flight tokens at the first byte
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
            changed = True
            session = st.sess
            if fast:
                itl = out.itl
            else:
                itl = st.itl if st.itl is not None else [st.gap_sum / st.gaps] if st.gaps else []
            e2e = now - st.start_s
            name = st.route.replica.name
            self.records.append(RequestRecord(session.id, st.turn, 200, st.start_s, e2e, st.ttft_s, itl,
                                              out.prompt_tokens, out.completion_tokens, out.cached_tokens, name))
            self.core.complete(st.route, st.lease, st.features, Outcome(
                ok=True, status=200, ttft_s=st.ttft_s, prompt_tokens=out.prompt_tokens,
                cached_tokens=out.cached_tokens, completion_tokens=out.completion_tokens, e2e_s=e2e), now=now)
            follow.append((st.session, st.turn + 1, session))
        if changed:
            self.refresh(i, now)

    def poll(self, now: float) -> None:
        """Every engine's report becomes its replica's `LoadSnapshot`, as the router's poller stores it."""
        for i, (state, eng) in enumerate(zip(self.states, self.engines, strict=True)):
            running, waiting, used = eng.load()
            state.load = LoadSnapshot(running, waiting, used, eng.num_blocks, eng.block_size, 0, 0, now,
                                      eng.max_num_seqs)
            self.refresh(i, now)
        if self.model is not None:
            self.model.polled()

    def proceed(self, s_idx: int, turn: int, now: float, session: wl.Session | None = None) -> None:
        """A session's next turn, or (closed loop) the client's next session, as loadgen's clients do."""
        session = session or self.sessions[s_idx]
        if turn < len(session.turns):
            self.send(s_idx, turn, now, session)
        elif self.closed:
            if self.left <= 0 or now > self.load.max_s:
                self.take(now)  # records why the client stopped
                return
            nxt = next(self.next_session, None)
            if nxt is not None:
                self.send(nxt, 0, now)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, policy_name: str, max_real_s: float, started: tuple[float, float]) -> SimRun:
        """Until nothing is left to happen; ``started`` is (perf_counter, process_time) at the call."""
        t_real, t_cpu = started
        load, heap, engines = self.load, self.heap, self.engines
        self.poll(0.0)
        self.push(self.poll_interval_s, _POLL, None)
        if self.closed:  # loadgen's three modes
            for _ in range(max(1, load.concurrency or 1)):
                s_idx = next(self.next_session, None)
                if s_idx is None:
                    break
                self.push(0.0, _SEND, (s_idx, 0))
        else:
            for s_idx, at in enumerate(arrival_times(self.workload, load)):
                if at > load.max_s:
                    self.stopped_by = "time"
                    break
                self.push(at, _SESSION, s_idx)
        deadline = t_real + max_real_s
        max_events = 64 * (min(load.max_requests, self.num_requests) + 16) * (1 + 64) + 10_000_000
        events = 0
        last_t = 0.0
        # The run allocates millions of small objects (records, heap entries) and keeps them; the cyclic
        # collector would rescan them again and again for nothing, so it is paused for the loop.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            while heap and events < max_events:
                t, _, _, kind, payload = heapq.heappop(heap)
                self.now = t
                events += 1
                if kind == _STEP_DONE:
                    i, epoch = payload
                    eng = engines[i]
                    if epoch != eng.epoch:
                        continue  # a decode window that an arrival cut short
                    follow: list[tuple[int, int, wl.Session]] = []
                    if self.model is not None:
                        self.model.step_done(i)
                    self.deliver(i, eng.finish(t), t, follow)
                    self.stepping[i] = False
                    if eng.has_work:
                        self.start_step(i, t)
                    last_t = t
                    for s_idx, turn, session in follow:
                        self.proceed(s_idx, turn, t, session)
                elif kind == _SEND:
                    self.proceed(*payload, t)
                elif kind == _SESSION:
                    if self.left > 0:
                        self.send(payload, 0, t)
                    else:
                        self.stopped_by = "count"
                else:  # _POLL: keep polling while anything can still happen
                    self.poll(t)
                    if heap or self.inflight:
                        self.push(t + self.poll_interval_s, _POLL, None)
                if events & 0x3FF == 1 and time.perf_counter() > deadline:
                    self.stopped_by = "time"
                    break
        finally:
            if gc_was_enabled:
                gc.enable()
        records = self.records
        if self.left <= 0 and self.stopped_by == "done" and len(records) < self.num_requests:
            self.stopped_by = "count"
        records.sort(key=lambda r: r.start_s)
        wall = max((r.start_s + r.e2e_s for r in records), default=last_t)
        return SimRun(
            policy=policy_name, records=records, wall_s=wall,
            per_replica={r.name: n for r, n in zip(self.states, self.served, strict=True)},
            reasons=self.reasons, real_s=time.perf_counter() - t_real, cpu_s=time.process_time() - t_cpu,
            stopped_by=self.stopped_by, steps=sum(e.steps for e in engines), events=events,
            preemptions=sum(e.preemptions for e in engines))
