"""A deterministic, in-memory, virtual-time fleet for judging policies by outcome, not by mechanism.

Fake replicas keep a bounded LRU prefix cache of block hashes (a hit needs the whole chain from the
first block, as in vLLM) and serve prefills one at a time, FIFO, taking
``overhead_s + per_token_s * uncached tokens``; decoding then takes ``max_tokens * decode_s_per_token``
(optionally slowed by each co-running sequence) without holding the prefill server. Closed-loop clients send their next request when the previous one
completes. The router side is the router's own: `router.routing.RoutingCore` over `ReplicaState`s (in-flight
counters kept by leases, views built by ``ReplicaState.view``), fed a fresh load report before every
decision (as if polled continuously), with engine-reported cached tokens as feedback.

Why a fake engine next to `benchmarks.sim_loop` (which runs the same routing core over the sim engine's
real scheduler): its one-prefill-at-a-time engine has analytic answers (the best hit rate of a pinned
workload is a formula), so these tests judge policies against numbers, not against another model.

Everything is seeded; a run of a few hundred requests takes milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from router.features import HashingConfig, RequestFeatures, features_from_body, features_from_text
from router.policies.base import Decision, Outcome, Policy, PolicyBase
from router.replica_view import ReplicaView
from router.replicas.state import Lease, LoadSnapshot, ReplicaState
from router.routing import Route, RoutingCore

MODEL = "sim-model"
HASHING = HashingConfig()
ENGINE_BLOCK_TOKENS = 16  # engine block size; with 64-char blocks at 4 chars/token, one char block


@dataclass
class FakeReplica:
    """A prefix cache of ``capacity_blocks`` chained block hashes plus a FIFO prefill server."""

    name: str
    capacity_blocks: int
    report_load: bool = True  # False: the router never receives a load report (load_age_s=None)
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    queue: deque[_Job] = field(default_factory=deque)
    busy: bool = False
    running: int = 0  # admitted and not finished (prefill or decode)

    def prefill(self, hashes: Sequence[int]) -> int:
        """Blocks found (contiguous from the start), then cache the whole chain, deepest blocks oldest."""
        hit = 0
        for h in hashes:
            if h not in self.cache:
                break
            hit += 1
        for h in reversed(hashes):
            self.cache[h] = None
            self.cache.move_to_end(h)
        while len(self.cache) > self.capacity_blocks:
            self.cache.popitem(last=False)
        return hit

    def report(self, now: float) -> LoadSnapshot | None:
        """The load report the router would hold at ``now``; None if this replica never reports."""
        if not self.report_load:
            return None
        return LoadSnapshot(running=self.running - len(self.queue), waiting=len(self.queue),
                            kv_blocks_used=min(len(self.cache), self.capacity_blocks),
                            kv_blocks_total=self.capacity_blocks, block_size=ENGINE_BLOCK_TOKENS,
                            prefix_cache_queries=0, prefix_cache_hits=0, received_at=now)


@dataclass
class _Job:
    client: int
    features: RequestFeatures
    route: Route
    lease: Lease
    sent_at: float


@dataclass
class SimResult:
    requests: Counter[str]  # per replica
    prompt_tokens: int
    cached_tokens: int
    ttfts: list[float]
    reasons: Counter[str]
    placements: dict[str, list[str]]  # affinity key -> replicas of its successive requests
    makespan_s: float

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def imbalance(self, replicas: int) -> float:
        """max / mean requests per replica (1.0 = perfectly even)."""
        total = sum(self.requests.values())
        return max(self.requests.values(), default=0) / (total / replicas) if total else 0.0

    def ttft_p90(self) -> float:
        ordered = sorted(self.ttfts)
        return ordered[int(0.9 * (len(ordered) - 1))] if ordered else 0.0


@dataclass
class Fleet:
    """Engine timing and geometry; defaults are roughly an 8B model on one GPU."""

    replicas: int = 4
    capacity_blocks: int = 2000  # per replica, in 64-char (16-token) blocks
    overhead_s: float = 0.005
    per_token_s: float = 2e-5
    decode_s_per_token: float = 0.01
    decode_slowdown_per_seq: float = 0.0  # each other running sequence makes decode this much slower
    silent: frozenset[str] = frozenset()  # replicas that never report load


@dataclass(frozen=True)
class Workload:
    """Request scripts. ``shared``: one queue pulled by ``clients`` clients; else one script per client."""

    scripts: tuple[tuple[RequestFeatures, ...], ...]
    clients: int
    shared: bool

    def iterators(self) -> list[Iterator[RequestFeatures]]:
        if self.shared:
            queue = iter(self.scripts[0])
            return [queue] * self.clients
        return [iter(s) for s in self.scripts]

    def __len__(self) -> int:
        return sum(len(s) for s in self.scripts)


def simulate(policy: Policy, workload: Workload, fleet: Fleet) -> SimResult:
    """Run ``workload``'s closed-loop clients through ``policy`` on ``fleet`` until every script is done."""
    clients = workload.iterators()
    replicas = {
        f"r{i}": FakeReplica(f"r{i}", fleet.capacity_blocks, report_load=f"r{i}" not in fleet.silent)
        for i in range(fleet.replicas)
    }
    for name in replicas:
        policy.on_replica_added(name)
    states = [ReplicaState.create(name, f"http://{name}") for name in replicas]
    core = RoutingCore(policy)
    events: list[tuple[float, int, Callable[[float], None]]] = []
    seq = itertools.count()
    result = SimResult(Counter(), 0, 0, [], Counter(), {}, 0.0)

    def at(t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(events, (t, next(seq), fn))

    def send(client: int, now: float) -> None:
        features = next(clients[client], None)
        if features is None:
            return
        for state in states:
            state.load = replicas[state.name].report(now)
        route = core.choose(features, states, now=now)
        decision = route.decision
        lease = core.dispatch(route, features, now)
        replica = replicas[decision.replica]
        replica.running += 1
        replica.queue.append(_Job(client, features, route, lease, now))
        result.requests[replica.name] += 1
        result.reasons[decision.reason] += 1
        if features.affinity_key is not None:
            result.placements.setdefault(features.affinity_key, []).append(replica.name)
        if not replica.busy:
            start(replica, now)

    def start(replica: FakeReplica, now: float) -> None:
        job = replica.queue.popleft()
        replica.busy = True
        f = job.features
        hit_blocks = replica.prefill(f.block_hashes)
        cached = min(int(hit_blocks * f.block_tokens), f.token_estimate)
        done = now + fleet.overhead_s + fleet.per_token_s * (f.token_estimate - cached)
        at(done, lambda t: prefilled(replica, job, cached, t))

    def prefilled(replica: FakeReplica, job: _Job, cached: int, now: float) -> None:
        job.lease.first_token()
        replica.busy = False
        ttft = now - job.sent_at
        result.ttfts.append(ttft)
        result.prompt_tokens += job.features.token_estimate
        result.cached_tokens += cached
        step = fleet.decode_s_per_token * (1.0 + fleet.decode_slowdown_per_seq * (replica.running - 1))
        decode = (job.features.max_tokens or 16) * step
        at(now + decode, lambda t: completed(replica, job, cached, ttft, t))
        if replica.queue:
            start(replica, now)

    def completed(replica: FakeReplica, job: _Job, cached: int, ttft: float, now: float) -> None:
        replica.running -= 1
        f = job.features
        outcome = Outcome(True, 200, ttft, f.token_estimate, cached, f.max_tokens or 16, None)
        core.complete(job.route, job.lease, f, outcome, now=now)
        result.makespan_s = now
        send(job.client, now)

    for client in range(len(clients)):
        at(0.0, lambda t, c=client: send(c, t))
    while events:
        t, _, fn = heapq.heappop(events)
        fn(t)
    return result


# -- workloads ---------------------------------------------------------------------------------------


def _text(rng: random.Random, chars: int) -> str:
    """Random lowercase text with spaces: distinct prompts differ from their first block."""
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz     ", k=chars))


def shared_prefix_groups(
    *,
    groups: int,
    questions: int,
    system_chars: int,
    question_chars: int,
    clients: int,
    max_tokens: int,
    seed: int,
) -> Workload:
    """SGLang's generated-shared-prefix shape: each group's questions share a long system prompt.
    Requests are shuffled and pulled from one queue by ``clients`` closed-loop clients."""
    rng = random.Random(seed)
    systems = [_text(rng, system_chars) for _ in range(groups)]
    order = [(g, q) for g in range(groups) for q in range(questions)]
    rng.shuffle(order)
    requests = tuple(
        features_from_text(
            systems[g] + "\n" + _text(rng, question_chars),
            MODEL,
            f"g{g}-q{q}",
            HASHING,
            max_tokens=max_tokens,
            affinity_key=f"group-{g}",
        )
        for g, q in order
    )
    return Workload((requests,), clients, shared=True)


def multi_turn_chats(
    *,
    conversations: int,
    turns: int,
    system_chars: int,
    first_user_chars: int,
    answer_chars: int,
    user_chars: int,
    max_tokens: int,
    seed: int,
) -> Workload:
    """One client per conversation; every conversation starts with the SAME system prompt. Each turn
    resends the whole history (parsed from a real chat body), so turn k+1 extends turn k."""
    rng = random.Random(seed)
    system = _text(rng, system_chars)

    def conversation(c: int) -> Iterator[RequestFeatures]:
        crng = random.Random(seed * 1000 + c)
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": _text(crng, first_user_chars)},
        ]
        for turn in range(turns):
            out = crng.randint(max(1, max_tokens // 2), 2 * max_tokens)  # uneven turns: load drifts
            body = {"model": MODEL, "messages": list(messages), "max_tokens": out}
            yield features_from_body(body, "chat", f"c{c}-t{turn}", HASHING, affinity_key=f"conv-{c}")
            messages.append({"role": "assistant", "content": _text(crng, answer_chars)})
            messages.append({"role": "user", "content": _text(crng, user_chars)})

    scripts = tuple(tuple(conversation(c)) for c in range(conversations))
    return Workload(scripts, conversations, shared=False)


class PinByKey(PolicyBase):
    """Oracle baseline: affinity key i-th seen -> replica i mod n (perfect stickiness, even spread)."""

    name = "pin_by_key"

    def __init__(self) -> None:
        super().__init__(seed=0)
        self._slots: dict[str, int] = {}

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        key = features.affinity_key or features.request_id
        slot = self._slots.setdefault(key, len(self._slots))
        return Decision(replica=replicas[slot % len(replicas)].name, reason="pinned")
