"""cost (the default): send each request where it costs least, counting what it does to the others.

For every eligible replica ``r`` the policy estimates, in seconds::

    cost(r) = [ queue(r)                                           # prefill work already ahead of it
              + kv_wait(r)                                         # waiting for free KV blocks
              + (1 + work_weight) * (prefill(r) + decode(r))       # its own work, and the same again
                                                                   #   as the delay it imposes on others
              + eviction_weight * prefill_s_per_token * evicted_tokens(r)
              ] / weight(r)
    prefill(r) = request_overhead_s + prefill_s_per_token * uncached_tokens(r)
    decode(r)  = decode_s_per_seq * running(r) * (1 + expected_output_tokens)
               + [running(r) > 0] * (shared_step + shared_per_seq * running(r))

with the time constants configured, scaled or learned per replica (``calibration``, below), and the
wait for a free slot added to ``queue(r)`` when ``r`` is at its concurrency limit.

and picks the minimum. Costs within ``tie_tolerance`` (relative) of the minimum count as equal; among
those the lower request load wins, then the lower cost, then the replica sent to least recently (so cold
prefixes on an idle fleet go round the replicas instead of wherever a random draw lands), then a seeded
random draw.

- ``uncached_tokens(r)``: the prompt's token estimate minus what ``r`` is believed to hold, from a
  per-replica prefix index matched on the prompt's block chain (``matched blocks * block_tokens``).
- ``queue(r)``: ``request_overhead_s`` per pending request plus ``prefill_s_per_token`` per pending
  uncached token. The router's view is ``in_flight_tokens`` (prompt tokens not yet prefilled) scaled by
  the uncached fraction of the requests this policy has in flight there, so a queue of cache hits looks
  as short as it is. When the engine's load report is fresh, its ``waiting`` count (times the average
  uncached request) raises that estimate: the max of both views, since other routers' traffic is only
  visible to the engine. A stale or missing report falls back to the router's view: never read as zero
  load, nor as infinite load.
- ``decode(r)``: every sequence running there slows each step of this request (its prefill step and its
  expected output: the average ``completion_tokens`` reported so far, at most ``max_tokens``, 128 until
  something is reported). ``running(r)`` is the router's in-flight requests that are past prefill, or
  the engine's fresh ``running`` if more, less the requests of ours that were in flight when that report
  was received and have finished since (it is up to a poll old: `Cost._reported_running`). And on a replica that is decoding, the prefill waits for and
  shares a decode step, which an idle replica does not charge (the calibration's TTFT model fits the
  same term); it is priced at the learned timing (`Calibrator.shared_step`): without it a busy replica
  holding a prefix looked as fast as an idle one, and on an engine whose steps grow with every running
  sequence the policy piled conversations onto two replicas.
- ``work_weight``: a request's prefill delays everything queued behind it, and its decode slows every
  sequence it shares steps with. Without this term a replica holding a prefix looks worse than an idle
  one the moment it has any queue, prefixes get recomputed everywhere, and a busy fleet loses throughput.
- saturation: an engine runs at most ``max_num_seqs`` sequences; beyond that a request waits for a
  slot, whatever the prefill queue. The limit comes from the engine's load report (``/load`` of this
  project's engine servers, sim and vLLM; a stock vLLM's /metrics does not say, and then the term is
  off: running/waiting alone cannot tell a slot limit from a queue for prefill or for KV blocks, which
  a test harness showed by teaching a limit of 1). When the router's requests in flight at ``r``
  reach it (its own count: the engine's lags a poll), the time until this request's slot frees is
  added to the queue term: with ``w`` requests waiting for a slot ahead of it and ``R = limit``
  running, each with a remaining decode uniform over its ``L = expected_output * (shared_step +
  shared_per_seq * R)`` (decode steps at the learned timing, as in ``decode(r)``: with the configured
  H100 ratios a step is worth 300 prefill tokens where an llmd-8b engine's is worth 48, and the wait
  looked 6x dearer than recomputing), the ``(w+1)``-th completion comes after ``(w+1) L / (R+1)``.
  Added, not maxed with the queue (as ``kv_wait``): the prompts waiting ahead are prefilled as slots
  free, and each prefill step holds up the decodes whose ends free the next slot. ``w`` is at least
  the engine's fresh ``waiting`` less one per request of ours that finished since the report while it
  showed every slot taken (each freed slot admitted a waiting prompt; x N router processes): a report
  a poll old otherwise priced the replica that had just freed a slot as full as before
  (docs/policies.md, "saturation", has what each of the two did).
- ``kv_wait(r)``: an engine admits a request only when its free KV blocks hold the request's uncached
  blocks (vLLM's ``allocate_slots``; free blocks include cached ones no running request holds, which it
  evicts rather than wait). From a fresh load report with ``R`` running holding ``used`` blocks: the
  blocks missing, ``M`` = this request's uncached blocks plus those of the prompts admitted before it
  (the engine's ``waiting`` at the mean uncached size plus what this router sent since the report, or
  its requests in flight beyond the reported running if more) minus the free blocks (with those of
  reported requests that finished since: a report is a poll old, and on an engine whose requests
  finish within a poll, counting in-flight beyond running saw nothing ahead and KV waits took 10 % of
  requests, `benchmarks.unseen`), free as running requests finish, ``used / R`` each; with remaining decodes
  uniform over ``L`` (as the slot wait's) that takes ``M / used * R / (R+1) * L``. Added to ``queue(r)``,
  not maxed with it: a prompt blocked on KV cannot prefill meanwhile, so each admission ahead waits for
  a finish and then for its prefill. 0 while the blocks are there, and without a fresh report or KV
  geometry.
- ``evicted_tokens(r)``: prompt blocks that must leave ``r``'s (full) cache to make room for this
  request's uncached blocks; they will likely have to be recomputed later.

Why this balances without a separate imbalance trigger: waiting and decode crowding are costs like
recomputing. When the replica holding a hot prefix queues up or crowds, staying costs more than
recomputing elsewhere, so the prefix gets replicated; conversations that share only a system prompt find
it everywhere after a few requests and spread by load, while each conversation's own growing prefix
keeps it where it is.

Except for where a conversation starts: its first turn's only hit is the shared system prompt, held at first
by one replica, and load of the moment decides whether it starts there; its later turns follow it. So a
prompt that starts a new thread (continues no earlier prompt, `router.policies.threads`) goes to the
replica with the fewest resident threads among those within the prefill its deepest hit saves of the
cheapest (that hit is saved once per replica; the placement is paid by every later turn), at most the
prefill its later turns are expected to bring (0 where prompts have none: gsp's single questions).

The prefix index is capacity-aware and self-correcting:

- each replica's LRU holds ``kv_blocks_total * block_size * kv_capacity_factor`` tokens' worth of blocks
  (from the views, re-read whenever they change; ``default_capacity_blocks`` until a report arrives),
  so the index forgets roughly when the engine evicts;
- on completion, if the engine reports clearly fewer ``cached_tokens`` than the index predicted (more
  than ``max(1, correction_slack * predicted)`` blocks fewer), the entries beyond what was really cached
  are dropped for that replica; if it reports more, nothing changes;
- a failed request that never produced a first token removes the entries its dispatch added.

Calibration: every finished request is an observation of the replica's timing (its TTFT against the
prefill work that was ahead of it and its own uncached tokens per the engine's ``cached_tokens``; its
decode time against the running sequences and the prefills dispatched meanwhile). `router.calibration`
fits the four time constants per replica from them, starting from the configured values, and the next
decision uses the result: all four fitted constants (``calibration="online"``), or (the default,
``"relative"``) the configured ones scaled by the replica's slowness relative to the fleet's lower-median
replica, which only moves a replica that differs by more than the deadband. ``"pinned"`` learns nothing.

Parameters (the prior of the time constants; the defaults follow a BLIS fit of Llama-3-8B on one H100:
~17 us per prefill token, ~6 us per decode sequence per step, ~6 ms per step):
    prefill_s_per_token (2e-5): prefill time per uncached prompt token.
    request_overhead_s (2e-3): fixed cost per request; well under an engine step (~6 ms) because a
        batched engine shares a step between many requests.
    decode_s_per_seq (1e-5): step time added per sequence running on the replica.
    decode_step_s (6e-3): time of a decode step (prices the wait for a free slot).
    calibration ("relative"): "relative", "online", "pinned", or `CalibrationSettings` fields as a
        mapping. "relative" (the default) keeps the configured ratios and learns how much slower each
        replica is than the fleet's typical (lower-median) one; "online" uses every fitted constant, which routed worse
        in the matrix (benchmarks/README.md, issue 15); "pinned" learns nothing.
    work_weight (1.0): how much a request's own work counts again for the requests it delays.
    eviction_weight (1.0): expected recompute of evicted blocks (0 disables the term).
    tie_tolerance (0.02): relative cost difference treated as a tie.
    kv_capacity_factor (1.0): fraction of the engine's KV cache the index assumes is prefix cache.
    default_capacity_blocks (2**20): index bound per replica before its KV geometry is known.
    correction_slack (0.05): fraction of predicted blocks a cached_tokens report may fall short by
        (token-count rounding) before entries are dropped.
    index ("auto"): which prefix matches are priced: ``"approximate"`` (the policy's own index),
        ``"precise"`` (the engines' KV events for synced replicas) or ``"auto"`` (events where synced,
        the larger of both where partial, else the approximate index); see `router.policies.kv_match`.
        Without KV events (``RequestFeatures.kv_match`` None) all three decide alike.
    kv_hold_s (0.0): exact modes count a request's blocks as held on its replica while in flight and this
        long after (for the events' lag). 0 by default: in the benchmarks a 0.25-2 s hold cost multiturn
        hit rate where the cache evicts (docs/kv_events.md, "Routing on the events").
    agree (True): with several router processes (``router_processes`` > 1), among the replicas within the
        load this process cannot see of the cheapest, the one holding the deepest match keeps the prompt,
        and a prompt the cache does not place (every replica holds the same of it) goes where rendezvous
        hashing of its first blocks says, so the processes agree where a new prefix goes
        (`router.policies.placement`).
    router_processes (1): how many router processes share the traffic (``--workers N``, or N router
        pods). With N > 1 ``agree`` acts, and the queue and running requests this process counts on a
        replica are priced N times (its requests are a random 1/N of the fleet's; the engines'
        reports lag a poll). 1 decides exactly as a lone router always has.
    candidates (8): in fleets of more than 4x this many replicas only the holders of the prompt and the
        least loaded replicas are priced, this many of the holders (deepest match first) and of the least
        loaded (`router.policies.candidates`); 0 prices every replica.
    seed / rng: tie-break random source.
Reason labels: ``"prefix"`` (went to a best-matching replica), ``"replicate"`` (a replica with a longer
match was passed over because of its load), ``"load"`` (nobody holds any of the prompt).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from router.calibration import CalibrationSettings, Calibrator, CostConstants, DecodeSample, TtftSample
from router.features.parse import RequestFeatures
from router.policies import placement
from router.policies.base import Decision, Outcome, PolicyBase, pick_lowest, require_replicas
from router.policies.candidates import DEFAULT_K as DEFAULT_CANDIDATES
from router.policies.candidates import CandidateFilter
from router.policies.kv_match import INDEX_MODES, Guess, InFlightBlocks, blend
from router.policies.threads import Threads, spread
from router.prefix_index import DEFAULT_CAPACITY_BLOCKS, PrefixIndex
from router.replica_view import ReplicaView

DEFAULT_OUTPUT_GUESS = 128.0  # expected completion tokens until the engine reports some
TURN_DECAY = 0.999  # per dispatch: later turns per thread follow the last ~1,000 requests


@dataclass(slots=True)
class _InFlight:
    """What this policy has in flight on one replica (sums of its own predictions)."""

    count: int = 0
    prompt_tokens: float = 0.0
    uncached_tokens: float = 0.0
    dispatched_tokens: float = 0.0  # cumulative uncached tokens ever dispatched (for decode samples)
    dispatched_requests: int = 0


@dataclass(slots=True)
class _SinceReport:
    """This policy's traffic on one replica since the engine's load report it last saw (``key``: the
    report's running, waiting and KV blocks used; ``age``: its age when last seen, which only grows
    until a new report replaces it). The report is up to a poll old, and on an engine whose requests
    finish within a poll the router's in-flight count minus the reported running misses what was sent
    since whenever as many reported ones finished meanwhile (`Cost._price`'s kv_wait)."""

    key: tuple[int, int, int]
    age: float
    sent_tokens: float = 0.0  # uncached tokens sent since: they take blocks the report counts as free
    finished: int = 0  # requests sent before the report that finished since: their blocks are free


@dataclass(slots=True, frozen=True)
class _Sent:
    """What the policy knew about one request when it was sent (the calibration's regressors)."""

    queued_tokens: float
    queued_requests: float
    running: float
    dispatched_tokens: float
    dispatched_requests: int


class Cost(PolicyBase):
    name = "cost"

    def __init__(
        self,
        *,
        prefill_s_per_token: float = 2e-5,
        request_overhead_s: float = 2e-3,
        decode_s_per_seq: float = 1e-5,
        decode_step_s: float = 6e-3,
        calibration: CalibrationSettings | Mapping[str, object] | str | None = None,
        work_weight: float = 1.0,
        eviction_weight: float = 1.0,
        tie_tolerance: float = 0.02,
        kv_capacity_factor: float = 1.0,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        correction_slack: float = 0.05,
        candidates: int = DEFAULT_CANDIDATES,
        index: str = "auto",
        kv_hold_s: float = 0.0,
        agree: bool = True,
        router_processes: int = 1,
        seed: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(seed=seed, rng=rng)
        if min(prefill_s_per_token, request_overhead_s, decode_s_per_seq, decode_step_s, work_weight,
               eviction_weight) < 0:
            raise ValueError("time constants and weights must be >= 0")
        if tie_tolerance < 0:
            raise ValueError("tie_tolerance must be >= 0")
        if prefill_s_per_token == 0 and request_overhead_s == 0:
            raise ValueError("prefill_s_per_token and request_overhead_s cannot both be 0")
        if kv_capacity_factor <= 0:
            raise ValueError("kv_capacity_factor must be > 0")
        if kv_hold_s < 0:
            raise ValueError("kv_hold_s must be >= 0")
        if router_processes < 1:
            raise ValueError("router_processes must be >= 1")
        if index not in INDEX_MODES:
            raise ValueError(f"index must be one of {', '.join(INDEX_MODES)}, not {index!r}")
        self.prefill_s_per_token = prefill_s_per_token
        self.request_overhead_s = request_overhead_s
        self.decode_s_per_seq = decode_s_per_seq
        self.decode_step_s = decode_step_s
        prior = CostConstants(request_overhead_s, prefill_s_per_token, decode_s_per_seq, decode_step_s)
        self.calibrator = Calibrator(prior, CalibrationSettings.of(calibration))  # type: ignore[arg-type]
        # name -> the constants as priced (`_effective`), last the calibrator's own ones they came from
        self._constants: dict[str, tuple[float, float, float, float, tuple[float, float, float, float]]] = {}
        # the calibrator's constants -> their shared step (`_shared_step`): keyed by the constants, not the
        # replica, since every replica priced alike shares one entry (at 1,000 replicas one call a decision)
        self._shared: dict[tuple[float, float, float, float], tuple[float, float]] = {}
        # the calibrator's (reference_version, fleet_version) when the caches above were last checked
        self._cached_at = (0, 0)
        self._views: dict[str, ReplicaView] = {}
        self._sent: dict[tuple[str, str], _Sent] = {}
        self.tie_tolerance = tie_tolerance
        self.work_weight = work_weight
        self.eviction_weight = eviction_weight
        self.kv_capacity_factor = kv_capacity_factor
        self.correction_slack = correction_slack
        self.index = PrefixIndex(default_capacity=default_capacity_blocks)
        self.index_mode = index
        self.agree = agree
        self.router_processes = router_processes
        # This process's counts of its own requests stand for 1/N of the fleet's: requests reach the N
        # processes at random, so N x own is the unbiased estimate of what all of them have sent there
        # (the engines' reports, fresh but a poll old, still raise it).
        self._own_scale = float(router_processes)
        self._in_flight_blocks = InFlightBlocks(kv_hold_s)  # exact modes: sent, maybe not announced by events yet
        self._inflight: dict[str, _InFlight] = {}
        self._since: dict[str, _SinceReport] = {}  # replica -> its traffic since its last report
        self._sent_under: dict[tuple[str, str], tuple[_SinceReport, float]] = {}  # request -> (report, uncached)
        self._geometry: dict[str, tuple[int, int, float]] = {}
        self._avg_uncached: float | None = None  # EWMA over dispatched requests
        self._avg_output: float | None = None  # EWMA of reported completion tokens
        self._engine_per_estimate = 1.0  # engine prompt tokens per estimated token (EWMA of reports)
        self._dispatches = 0
        self._last_sent: dict[str, int] = {}  # replica -> number of the dispatch that last went there
        self.candidates = CandidateFilter(candidates, self.index)  # large fleets: what choose() prices
        self.threads = Threads()  # conversations resident per replica (`router.policies.threads`)
        # decayed over dispatches: threads started, turns that continued one, those turns' uncached tokens
        self._turns = [0.0, 0.0, 0.0]

    # -- decide ------------------------------------------------------------------------------------

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        require_replicas(replicas)
        block_tokens = features.block_tokens
        tokens = float(features.token_estimate)
        decode_steps = 1.0 + self._expected_output(features)
        filt, last = self.candidates, self._last_sent
        blended = features.kv_match is not None and self.index_mode != "approximate"
        large = filt.active(len(replicas))  # a large fleet: price only the holders and the least loaded
        selected = None
        if large and not blended:  # the holders as masks: never named all, whatever their number
            groups = self.index.match_masks(features.block_hashes)
            selected = filt.select(replicas, groups, last)
            if selected is not None:
                best = groups[0][0] if groups else 0
                matched = self._depths(selected, groups) if groups else {}
        if selected is None:
            if blended:  # the guess is walked only if the blend reads it (`kv_match.Guess`)
                guess = Guess(self.index, features.block_hashes)
                matched = blend(self.index_mode, guess, features, self._in_flight_blocks,
                                self._admission_room(replicas, features), self.router_processes == 1)
            else:
                matched = self.index.match(features.block_hashes)
            best = max(matched.values(), default=0)
            if large and blended:
                selected = filt.select_matched(replicas, matched, last)
        priced = replicas if selected is None else selected
        costs = self._price(priced, matched, tokens, block_tokens, decode_steps)
        if selected is not None:  # candidates: the order re-reads their keys
            keyed = filt.seen
            for view in priced:
                keyed(view, last.get(view.name, -1))
        agreed = None
        if self.agree and self.router_processes > 1:  # near-equal costs: the cache, then agreement, decide
            agreed = placement.agree(features.block_hashes, block_tokens, priced, costs, matched,
                                     self._own_prefill(priced, costs, tokens, block_tokens),
                                     self.router_processes)
        cutoff = min(costs.values()) * (1.0 + self.tie_tolerance)
        near = [r for r in priced if costs[r.name] <= cutoff]
        fresh_thread = None
        if agreed is None and self._turns[1] > 0 and self.threads.continued(features.block_hashes) is None:
            fresh_thread = spread(priced, costs, matched, self._hit_margin(priced, costs, block_tokens),
                                  self.threads.resident, self.tie_tolerance)
        if agreed is not None:
            pick = agreed
        elif fresh_thread is not None:
            pick = fresh_thread
        elif len(near) == 1:
            pick = near[0]
        else:  # near-equal costs: less loaded, then cheaper, then least recently sent to, then a draw
            last = self._last_sent
            pick = pick_lowest(near, lambda r: (r.request_load() / _weight(r), costs[r.name],
                                                last.get(r.name, -1)), self.rng)
        got = matched.get(pick.name, 0)
        reason = "load" if best == 0 else "prefix" if got == best else "replicate"
        return Decision(replica=pick.name, reason=reason, matched_blocks=got, scores=costs)

    def _own_prefill(self, priced: Sequence[ReplicaView], costs: Mapping[str, float], tokens: float,
                     block_tokens: float) -> Callable[[int], float]:
        """``agree``'s margin: the prompt's own prefill past ``common`` blocks, as `_cost` prices it on the
        cheapest replica (its calibrated constants and weight): the configured prior would set a margin in
        other units than the costs it is compared with once calibration moved them."""
        cheapest = min(priced, key=lambda v: costs[v.name])
        overhead, per_token = self._constants[cheapest.name][:2]
        scale = (1.0 + self.work_weight) / _weight(cheapest)
        return lambda common: scale * (overhead + per_token * max(0.0, tokens - common * block_tokens))

    def _hit_margin(self, priced: Sequence[ReplicaView], costs: Mapping[str, float],
                    block_tokens: float) -> Callable[[int], float]:
        """`threads.spread`'s margin: the prefill a new thread's hit saves (priced as `_own_prefill`), at most
        the prefill its later turns are expected to bring (later turns per thread times their mean uncached
        tokens, over recent dispatches): balancing a thread is worth recomputing no more than the work it
        places; the hit is saved once, the placement is paid by every later turn, and where prompts have
        no later turns (gsp's questions) nothing changes."""
        cheapest = min(priced, key=lambda v: costs[v.name])
        per_token = self._constants[cheapest.name][1]
        started, _, later_tokens = self._turns
        future = later_tokens / started if started > 0 else 0.0
        scale = (1.0 + self.work_weight) * per_token / _weight(cheapest)
        return lambda blocks: scale * min(blocks * block_tokens, future)

    def _admission_room(self, replicas: Sequence[ReplicaView], features: RequestFeatures) -> Callable[[str], float | None]:
        """Per replica, the estimated tokens it can allocate before admitting this request without evicting
        its announced match: free blocks minus the uncached prompts the engine reports waiting (the
        requests it admitted already hold their blocks: the router's own not-yet-prefilled count would
        count them twice); None (no bound) when none wait or the report is not fresh
        (`router.policies.kv_match`, "Admission")."""
        views: dict[str, ReplicaView] | None = None
        ids = features.kv_match.token_ids if features.kv_match is not None else None
        ratio = features.token_estimate / len(ids) if ids else 1.0  # estimated tokens per engine token

        def room(name: str) -> float | None:
            nonlocal views
            if views is None:
                views = {v.name: v for v in replicas}
            view = views.get(name)
            if view is None or not view.engine_fresh() or view.kv_blocks_total <= 0 or view.block_size <= 0:
                return None
            if view.waiting <= 0:  # admitted at the engine's next step: nothing allocates before it
                return None
            per_request = self._uncached_per_prompt(name, float(features.token_estimate))
            return (view.kv_blocks_total - view.kv_blocks_used) * view.block_size * ratio - view.waiting * per_request

        return room

    def _depths(self, views: Sequence[ReplicaView], groups: Sequence[tuple[int, int]]) -> dict[str, int]:
        """``{name: matched blocks}`` of the holders among ``views`` (`PrefixIndex.match_masks` groups)."""
        bit_of, out = self.index.bit, {}
        for view in views:
            bit = bit_of(view.name)
            if bit:
                for depth, mask in groups:
                    if mask & bit:
                        out[view.name] = depth
                        break
        return out

    def estimate_cost(self, view: ReplicaView, uncached_tokens: float, features: RequestFeatures) -> float:
        """Seconds charged for sending a request needing ``uncached_tokens`` of prefill to ``view``."""
        decode_steps = 1.0 + self._expected_output(features)
        return self._price([view], {}, uncached_tokens, features.block_tokens, decode_steps)[view.name]

    def _price(self, views: Sequence[ReplicaView], matched: Mapping[str, int], tokens: float,
               block_tokens: float, decode_steps: float) -> dict[str, float]:
        """``{name: cost}`` of each of ``views`` for a prompt of ``tokens`` of which ``matched[name]`` blocks
        are held: the formula of the module docstring, flattened. This is the hot loop (every priced
        replica of every decision), so what is the same for the whole decision is read once, a replica's
        state (its view's fields, this policy's in-flight sums, its constants and shared step) once per
        replica, and the helpers are inlined (not `_report_since`, which keeps a report's record); the
        float operations are those of the formula, in its order. Pricing also keeps each replica's latest
        view (on_dispatch and on_complete read it) and sizes its index from its KV geometry
        (`_sync_capacity`)."""
        costs: dict[str, float] = {}
        geometry, seen_views, constants, shared_of = self._geometry, self._views, self._constants, self._shared
        inflight_of, report_since = self._inflight, self._report_since
        scale, work = self._own_scale, 1.0 + self.work_weight
        eviction, headroom = self.eviction_weight, self.index.headroom
        avg_uncached, per_estimate = self._avg_uncached, self._engine_per_estimate
        steps_after = decode_steps - 1.0
        for view in views:
            name = view.name
            total, block_size = view.kv_blocks_total, view.block_size
            if geometry.get(name) != (total, block_size, block_tokens):
                self._sync_capacity(view, block_tokens)
            seen_views[name] = view
            uncached = tokens - min(matched.get(name, 0) * block_tokens, tokens)
            fresh = view.load_age_s is not None  # the view already dropped a stale report
            flight, queued, waiting = view.in_flight_requests, view.in_flight_tokens, view.waiting
            own = inflight_of.get(name)
            # _pending: (uncached tokens, requests) queued for prefill ahead of this request
            engine_queue = fresh and waiting > 0
            if queued == 0 and not engine_queue:  # the common idle-ish case, kept cheap
                pending_tokens = pending_requests = 0.0
            else:
                if own is not None and own.count > 0 and own.prompt_tokens > 0:
                    share = min(1.0, float(queued) / own.prompt_tokens)  # our in-flight prompt mass not prefilled
                    pending_tokens = own.uncached_tokens * share * scale
                    pending_requests = own.count * share * scale
                else:  # nothing of ours there (or a restart): take the router's counters at face value
                    pending_tokens = float(queued) * scale
                    pending_requests = flight * scale if queued > 0 else 0.0
                if engine_queue:
                    per_request = (own.uncached_tokens / own.count if own is not None and own.count > 0
                                   else avg_uncached if avg_uncached is not None else uncached)
                    queue_tokens = waiting * per_request
                    if queue_tokens > pending_tokens:
                        pending_tokens = queue_tokens
                    if float(waiting) > pending_requests:
                        pending_requests = float(waiting)
            in_flight = flight * scale
            running = in_flight - pending_requests
            reported = view.running
            if fresh and reported > running:  # `_reported_running`, ours finished since standing for 1/N
                discounted = reported - view.finished_since_report * scale
                if discounted > running:
                    running = discounted
            consts = constants.get(name)
            if consts is None:
                consts = constants[name] = self._effective(name)
            overhead, per_token, per_seq, _, raw = consts
            shared = None  # (decode step, per sequence) at the learned timing: read when first needed
            seconds = overhead * pending_requests + per_token * pending_tokens
            limit = view.max_num_seqs
            # Occupancy from the router's own count: exact now, while the engine's running lags a poll and
            # still counts a conversation's previous turn when its next one arrives.
            if limit and in_flight >= limit:
                ahead = float(in_flight - limit)  # requests waiting for a slot before us
                if fresh:  # the report's waiting, less those admitted since to slots that finished requests freed
                    promoted = waiting - view.finished_since_report * scale if reported >= limit else waiting
                    if promoted > ahead:
                        ahead = float(promoted)
                busy = float(limit)
                shared = shared_of.get(raw) or self._shared_step(name, raw)
                slot_wait = (ahead + 1.0) * steps_after * (shared[0] + shared[1] * busy) / (busy + 1.0)
                seconds += slot_wait
            used = view.kv_blocks_used
            if fresh and reported > 0 and used > 0 and block_size > 0:
                # kv_wait: until the free KV blocks hold this request's uncached blocks and those of the
                # prompts admitted before it (the engine's blocks, in its tokens per estimated token)
                busy, used = float(reported), float(used)
                since = report_since(view)  # the traffic since the load report
                per_prompt = (own.uncached_tokens / own.count if own is not None and own.count > 0
                              else avg_uncached if avg_uncached is not None else uncached)
                # Ahead: the report's waiting prompts and what was sent since, or the router's in-flight
                # count beyond the reported running if more; the report's finished ones freed theirs.
                ahead = float(waiting) * per_prompt + since.sent_tokens * scale
                beyond = (in_flight - busy) * per_prompt
                if beyond > ahead:
                    ahead = beyond
                finished = float(since.finished)
                freed = used / busy * (busy if busy < finished else finished)
                missing = (uncached + ahead) * per_estimate / block_size - (total - used + freed)
                if missing > 0:
                    if shared is None:
                        shared = shared_of.get(raw) or self._shared_step(name, raw)
                    life = steps_after * (shared[0] + shared[1] * busy)
                    seconds += missing / used * busy / (busy + 1.0) * life
            own_s = overhead + per_token * uncached
            if running > 0:
                if shared is None:
                    shared = shared_of.get(raw) or self._shared_step(name, raw)
                own_s += per_seq * running * decode_steps + shared[0] + shared[1] * running
            seconds += work * own_s
            if eviction and uncached > 0:
                new_blocks = uncached / block_tokens
                overflow = new_blocks - headroom(name)
                if overflow > 0:
                    evicted_tokens = (overflow if overflow < new_blocks else new_blocks) * block_tokens
                    seconds += eviction * per_token * evicted_tokens
            weight = view.weight
            costs[name] = seconds / weight if weight > 0 else seconds
        return costs

    def _report_since(self, view: ReplicaView) -> _SinceReport:
        """The traffic since ``view``'s load report, restarted when the report changed or got younger."""
        key = (view.running, view.waiting, view.kv_blocks_used)
        age = view.load_age_s if view.load_age_s is not None else math.inf
        since = self._since.get(view.name)
        if since is None or since.key != key or age < since.age:
            since = self._since[view.name] = _SinceReport(key, age)
        else:
            since.age = age
        return since

    def _reported_running(self, view: ReplicaView) -> float:
        """The engine's reported ``running`` less the requests that were in flight when the report was
        received and have finished since: ours (``ReplicaView.finished_since_report``, counted by the
        replica's leases) times the router processes, as our in-flight stands for 1/N of the fleet's.
        Otherwise a report taken while a request ran and read after it finished prices an idle replica
        as decoding for up to a poll: live, a warm-up request did that to one of 4 replicas, and a burst
        of 8 conversations' first turns avoided it (3 started on one replica, 1 on it). Counting from the
        report's receipt, not from the policy's first sight of it, takes off nothing that finished before
        the report was taken (an earlier rule did: another router's load then read as idle). Our own
        count, exact, still bounds the estimate from below."""
        return view.running - view.finished_since_report * self._own_scale

    def _expected_output(self, features: RequestFeatures) -> float:
        guess = DEFAULT_OUTPUT_GUESS if self._avg_output is None else self._avg_output
        return guess if features.max_tokens is None else min(guess, float(features.max_tokens))

    def _pending(self, view: ReplicaView, fresh: bool, fallback_uncached: float) -> tuple[float, float]:
        """(uncached tokens, requests) queued for prefill ahead of a new request on ``view``. `_price` inlines
        the same steps for its hot loop; tests/router/test_cost_pricing.py prices with this one, so the two
        cannot drift apart unnoticed."""
        tokens = float(view.in_flight_tokens)
        engine_queue = fresh and view.waiting > 0
        if tokens == 0 and not engine_queue:  # the common idle-ish case, kept cheap
            return 0.0, 0.0
        own = self._inflight.get(view.name)
        if own is not None and own.count > 0 and own.prompt_tokens > 0:
            share = min(1.0, tokens / own.prompt_tokens)  # part of our in-flight prompt mass not prefilled
            pending_tokens = own.uncached_tokens * share * self._own_scale
            pending_requests = own.count * share * self._own_scale
        else:  # nothing of ours there (or a restart): take the router's counters at face value
            pending_tokens = tokens * self._own_scale
            pending_requests = view.in_flight_requests * self._own_scale if tokens > 0 else 0.0
        if engine_queue:
            per_request = self._uncached_per_prompt(view.name, fallback_uncached)
            pending_tokens = max(pending_tokens, view.waiting * per_request)
            pending_requests = max(pending_requests, float(view.waiting))
        return pending_tokens, pending_requests

    def _uncached_per_prompt(self, name: str, fallback: float) -> float:
        """Uncached tokens of a prompt the engine reports waiting on ``name``: the mean of ours in flight
        there, else of everything we sent, else ``fallback``."""
        own = self._inflight.get(name)
        if own is not None and own.count > 0:
            return own.uncached_tokens / own.count
        if self._avg_uncached is not None:
            return self._avg_uncached
        return fallback

    # -- commit and learn --------------------------------------------------------------------------

    def on_dispatch(self, features: RequestFeatures, decision: Decision) -> None:
        self._dispatches += 1
        self._last_sent[decision.replica] = self._dispatches
        self.candidates.dispatched(decision.replica, self._dispatches)
        self.index.add(decision.replica, features.block_hashes, decision.matched_blocks)
        hashes = features.block_hashes
        uncached = self._uncached(features, decision.matched_blocks)
        if hashes:
            turns = self._turns
            turns[0] *= TURN_DECAY
            turns[1] *= TURN_DECAY
            turns[2] *= TURN_DECAY
            if self.threads.dispatched(decision.replica, hashes):
                turns[1] += 1.0
                turns[2] += uncached
            else:
                turns[0] += 1.0
        if features.kv_match is not None and self.index_mode != "approximate":
            self._in_flight_blocks.add(decision.replica, features.block_hashes)
        own = self._inflight.setdefault(decision.replica, _InFlight())
        view = self._views.get(decision.replica)
        if not self.calibrator.pinned:
            queued_tokens = queued_requests = running = 0.0
            if view is not None:
                fresh = view.engine_fresh()
                queued_tokens, queued_requests = self._pending(view, fresh, uncached)
                running = self._running(view, fresh, queued_requests)
            self._sent[(features.request_id, decision.replica)] = _Sent(
                queued_tokens, queued_requests, running, own.dispatched_tokens, own.dispatched_requests)
        if view is not None and view.load_age_s is not None:
            since = self._report_since(view)
            since.sent_tokens += uncached
            self._sent_under[(features.request_id, decision.replica)] = (since, uncached)
        own.dispatched_tokens += uncached
        own.dispatched_requests += 1
        own.count += 1
        own.prompt_tokens += features.token_estimate
        own.uncached_tokens += uncached
        avg = self._avg_uncached
        self._avg_uncached = uncached if avg is None else 0.9 * avg + 0.1 * uncached

    def on_complete(self, features: RequestFeatures, decision: Decision, outcome: Outcome) -> None:
        self._release(features, decision)
        self.candidates.completed(decision.replica)
        if features.kv_match is not None and self.index_mode != "approximate":
            self._in_flight_blocks.remove(decision.replica, features.block_hashes)
        sent = self._sent.pop((features.request_id, decision.replica), None)
        under = self._sent_under.pop((features.request_id, decision.replica), None)
        current = self._since.get(decision.replica)
        if current is not None:
            if under is not None and under[0] is current:  # sent since the report: gives back what it took
                current.sent_tokens = max(0.0, current.sent_tokens - under[1])
            else:  # in the report: its blocks are free again
                current.finished += 1
        if sent is not None and outcome.ok:
            self._learn(features, decision, outcome, sent)
        if outcome.ok and outcome.completion_tokens is not None:
            avg, out = self._avg_output, float(outcome.completion_tokens)
            self._avg_output = out if avg is None else 0.9 * avg + 0.1 * out
        if outcome.ok and outcome.prompt_tokens and features.token_estimate > 0:
            ratio = outcome.prompt_tokens / features.token_estimate
            self._engine_per_estimate = 0.9 * self._engine_per_estimate + 0.1 * ratio
        hashes = features.block_hashes
        if not outcome.ok:
            if outcome.ttft_s is None:  # never prefilled: what this dispatch added is not there
                self.index.discard(decision.replica, hashes[decision.matched_blocks :])
            return
        predicted = decision.matched_blocks
        if outcome.cached_tokens is None or predicted == 0:
            return
        real = self._real_cached_blocks(features, outcome)
        if real < predicted - max(1, math.ceil(self.correction_slack * predicted)):
            self.index.discard(decision.replica, hashes[real:])

    def on_replica_removed(self, name: str) -> None:
        self.index.remove_replica(name)
        self._in_flight_blocks.forget(name)
        self._inflight.pop(name, None)
        self._since.pop(name, None)
        self._geometry.pop(name, None)
        self._last_sent.pop(name, None)
        self.calibrator.remove(name)
        self._constants.pop(name, None)
        self._views.pop(name, None)
        self.candidates.forget(name)
        self.threads.forget(name)

    def calibration(self, name: str) -> dict[str, object]:
        """The learned time constants and slot limit of ``name`` (admin API, metrics; not `Policy`)."""
        view = self._views.get(name)
        return {**self.calibrator.snapshot(name), "slot_limit": (view.max_num_seqs or None) if view else None}

    # -- calibration -------------------------------------------------------------------------------

    def _effective(self, name: str) -> tuple[float, float, float, float, tuple[float, float, float, float]]:
        """The learned constants as priced: the crowding term keeps at least the configured ratio of
        per-sequence to per-token time. It also stands for what running sequences bring later (the next
        turns of the conversations held there), which no timing observation shows: an engine whose steps
        do not slow with more sequences still queues their next prefills. Last, the calibrator's
        constants themselves (the key of the shared-step cache)."""
        raw = self.calibrator.constants(name).as_tuple()
        overhead, per_token, per_seq, step = raw
        if self.prefill_s_per_token > 0:
            per_seq = max(per_seq, per_token * self.decode_s_per_seq / self.prefill_s_per_token)
        return overhead, per_token, per_seq, step, raw

    def _shared_step(self, name: str, raw: tuple[float, float, float, float]) -> tuple[float, float]:
        """(decode step, per running sequence) of the step a prefill waits for and shares on a replica
        that is decoding: the TTFT a busy replica adds over an idle one (the calibration's TTFT model
        fits the same term), at the learned timing, in the units the other constants are priced in.

        `Calibrator.shared_step` depends on the replica only through its constants (``raw``, those
        `_effective` read) and otherwise on the fleet fit, which moves only with an observation; so it
        is cached per constants and dropped when the fit moves. Every observation moves it, and with a
        cache per replica each of a decision's priced replicas asked the calibrator again."""
        shared = self._shared.get(raw)
        if shared is None:
            shared = self.calibrator.shared_step(name)
            if self.calibrator.constants(name).as_tuple() == raw:  # only what a fresh read would give
                self._shared[raw] = shared
        return shared

    def _running(self, view: ReplicaView, fresh: bool, pending_requests: float) -> float:
        running = view.in_flight_requests * self._own_scale - pending_requests
        if fresh and view.running > running:
            running = max(running, self._reported_running(view))
        return max(0.0, running)

    def _learn(self, features: RequestFeatures, decision: Decision, outcome: Outcome, sent: _Sent) -> None:
        name = decision.replica
        ttft, e2e = outcome.ttft_s, outcome.e2e_s
        if ttft is None:
            return
        estimate = float(features.token_estimate)
        if outcome.prompt_tokens and outcome.cached_tokens is not None:  # the engine's truth, our units
            uncached = max(0, outcome.prompt_tokens - outcome.cached_tokens) / outcome.prompt_tokens * estimate
        else:
            uncached = self._uncached(features, decision.matched_blocks)
        observed = False
        unary = e2e is not None and ttft >= e2e  # no first-token time: TTFT is the whole request
        # Only requests sent with nothing queued ahead teach the TTFT constants: the queue ahead is the
        # router's estimate, and fitted through it a busy replica's prefill looks free (measured in the
        # matrix: a per-token time learned 60x too low, and all traffic sent there).
        if not unary and sent.queued_requests == 0:
            observed |= self.calibrator.observe(name, TtftSample(
                ttft, uncached, sent.queued_tokens, sent.queued_requests, sent.running))
        steps = (outcome.completion_tokens or 0) - 1
        if e2e is not None and not unary and steps > 0:
            own = self._inflight.get(name) or _InFlight()
            view = self._views.get(name)
            now_running = sent.running
            if view is not None:
                fresh = view.engine_fresh()
                now_running = self._running(view, fresh, self._pending(view, fresh, 0.0)[1])
            # Prefills of requests sent there meanwhile shared these steps: take out their estimated time.
            overhead, per_token, _, _ = self.calibrator.constants(name).as_tuple()
            others = (overhead * max(0, own.dispatched_requests - sent.dispatched_requests - 1)
                      + per_token * max(0.0, own.dispatched_tokens - sent.dispatched_tokens - uncached))
            decode_s = max(0.5 * (e2e - ttft), e2e - ttft - others)
            observed |= self.calibrator.observe(name, DecodeSample(
                decode_s, steps, max(1.0, (sent.running + 1.0 + now_running) / 2.0)))
        if observed:
            cal = self.calibrator
            if cal.settings.mode == "relative":  # the fleet's fit and reference may have moved
                # Another replica's constants depend only on its own slowness and the reference, its
                # shared step on those and the fleet fit: drop everything only when these moved.
                at = (cal.reference_version, cal.fleet_version)
                reference_moved, fleet_moved = at[0] != self._cached_at[0], at[1] != self._cached_at[1]
                self._cached_at = at
                if reference_moved:
                    self._constants.clear()
                else:
                    self._constants.pop(name, None)
                if fleet_moved:  # the shared step's other input (the reference moves only the keys)
                    self._shared.clear()
            else:  # the shared step is a function of the constants alone: bound the cache, never stale
                self._constants.pop(name, None)
                if len(self._shared) > 4096:
                    self._shared.clear()

    def index_size(self, name: str) -> int:
        """Blocks the index believes ``name`` holds (read by the admin API; not part of `Policy`)."""
        return self.index.size(name)

    # -- helpers -----------------------------------------------------------------------------------

    def _sync_capacity(self, view: ReplicaView, block_tokens: float) -> None:
        """Size the replica's LRU from the engine's KV geometry whenever that (or block size) changes."""
        geometry = (view.kv_blocks_total, view.block_size, block_tokens)
        if self._geometry.get(view.name) == geometry:
            return
        self._geometry[view.name] = geometry
        kv_tokens = view.kv_capacity_tokens()
        if kv_tokens is None:
            capacity = self.index.default_capacity
        else:
            capacity = int(kv_tokens * self.kv_capacity_factor / max(block_tokens, 1e-9))
        self.index.set_capacity(view.name, capacity)

    def _release(self, features: RequestFeatures, decision: Decision) -> None:
        own = self._inflight.get(decision.replica)
        if own is None or own.count == 0:
            return
        own.count -= 1
        if own.count == 0:  # reset instead of subtracting, so float drift cannot accumulate
            own.prompt_tokens = own.uncached_tokens = 0.0
            return
        own.prompt_tokens = max(0.0, own.prompt_tokens - features.token_estimate)
        own.uncached_tokens = max(
            0.0, own.uncached_tokens - self._uncached(features, decision.matched_blocks)
        )

    @staticmethod
    def _uncached(features: RequestFeatures, matched_blocks: int) -> float:
        tokens = float(features.token_estimate)
        return tokens - min(matched_blocks * features.block_tokens, tokens)

    @staticmethod
    def _real_cached_blocks(features: RequestFeatures, outcome: Outcome) -> int:
        """The engine's cached token count, in our blocks. With the engine's prompt token count we use
        this request's real tokens-per-character instead of the ``chars_per_token`` guess."""
        cached = float(outcome.cached_tokens or 0)
        if outcome.prompt_tokens:
            blocks = cached / outcome.prompt_tokens * features.token_estimate / features.block_tokens
        else:
            blocks = cached / features.block_tokens
        return math.floor(blocks + 1e-9)


def _weight(view: ReplicaView) -> float:
    return view.weight if view.weight > 0 else 1.0
