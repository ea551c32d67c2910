"""K router processes and the engines' KV events in the offline simulator (issue 14, item 4's goals).

Why: live, ``python -m router --workers K`` runs K processes that each decide alone: each has its own
policy (approximate index, in-flight view, calibration, tie-break state) and its own requests in flight;
what they share is the truth the engines publish, the load reports and the KV events. A live run of that
on a shared 2-core host is noisy (four routers competing with engines and client for CPU); here the same
question is asked in virtual time, with the real policies and the sim engine's own scheduler and cache.

`RouterProcesses` stands in for the simulator's one `RoutingCore` (`benchmarks.sim_loop._Sim.core`):

- K policy instances (seeds ``seed + k``), each behind its own `RoutingCore` over its own `ReplicaState`s,
  so each process's in-flight counters and leases count only its own requests, as live;
- every request goes to one process, drawn at random (seeded; live, SO_REUSEPORT hashes the client's
  pooled keep-alive connections over the processes) or round-robin; its completion goes back there;
- every load poll copies each engine's report into every process's replica state (the global signal);
- with ``kv_events``, each request carries a `SimKVMatch` (the `KVMatch` protocol the cost policy reads):
  per replica, how many leading blocks of the prompt the engine has *announced*. Announced = the engine
  cache's own `BlockStored`/`BlockRemoved` events, applied when the step that produced them ends (live,
  the engine publishes a step's batch after the step; network and subscriber lag are not modelled).
  Every replica is ``synced``: the simulator loses no events.

K=1 without events routes exactly as the plain simulator does (a test checks it). K processes against
one over the matrix's engines: ``python -m benchmarks.processes``. Only the stepped engine
(``engine="exact"``) publishes events; the fast engine has no event queue, so ``kv_events`` needs it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.sim_engines import PromptEncoder
from engine_server.sim.kv_cache import block_hashes
from kv_wire import AllBlocksCleared, BlockRemoved, BlockStored
from router.features import RequestFeatures
from router.policies import create_policy
from router.policies.base import Outcome, Policy
from router.replica_view import ReplicaView
from router.replicas.state import Lease, ReplicaState
from router.routing import Route, RoutingCore

SPREADS = ("random", "round_robin")


class AnnouncedCache:
    """One engine's cached blocks as its KV events have announced them so far (engine block hashes)."""

    __slots__ = ("blocks",)

    def __init__(self) -> None:
        self.blocks: set[int] = set()

    def apply(self, events: Sequence[Any]) -> None:
        blocks = self.blocks
        for ev in events:
            if isinstance(ev, BlockStored):
                blocks.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                blocks.difference_update(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                blocks.clear()

    def match(self, hashes: Sequence[int]) -> int:
        blocks = self.blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n


class SimKVMatch:
    """One request's announced matches on every replica (the `router.policies.kv_match.KVMatch` protocol),
    computed on first use, as `router.kv_events.prefix_source.RequestMatch` is."""

    __slots__ = ("_owner", "_messages", "_ids", "_matches")

    def __init__(self, owner: RouterProcesses, messages: Sequence[dict[str, Any]]) -> None:
        self._owner, self._messages = owner, messages
        self._ids: list[int] | None = None
        self._matches: dict[str, tuple[int, str]] | None = None

    @property
    def token_ids(self) -> list[int] | None:
        if self._ids is None:
            self._ids = self._owner.encoder.encode(self._messages)[0]
        return self._ids

    def match(self) -> Mapping[str, tuple[int, str]]:
        if self._matches is None:
            owner = self._owner
            ids = self.token_ids
            assert ids is not None
            hashes = block_hashes(ids, owner.block_size, owner.hash_seed)
            self._matches = {name: (cache.match(hashes), "synced")
                             for name, cache in zip(owner.names, owner.announced, strict=True)}
        return self._matches

    def cached_tokens(self, replica: str) -> int | None:
        m = self.match().get(replica)
        ids = self.token_ids
        if m is None or ids is None:
            return None
        bs = self._owner.block_size
        return min(m[0] * bs, max(len(ids) - 1, 0) // bs * bs)


class RouterProcesses:
    """K independent router processes in front of the simulator's engines (see the module docstring).

    Duck-types the `RoutingCore` calls the simulator makes (``choose``, ``dispatch``, ``complete``) and
    offers its hooks: ``features`` (attach the KV match), ``polled`` (share load reports), ``step_done``
    (apply an engine step's KV events).
    """

    def __init__(self, states: Sequence[ReplicaState], engines: Sequence[Any], policy_name: str,
                 policy_params: Mapping[str, Any] | None, *, processes: int, seed: int, stale_after_s: float,
                 kv_events: bool = False, spread: str = "random", policies: Sequence[Policy] | None = None,
                 clock: Any = None) -> None:
        if processes < 1:
            raise ValueError("router processes must be >= 1")
        if spread not in SPREADS:
            raise ValueError(f"spread must be one of {', '.join(SPREADS)}, not {spread!r}")
        self.k = processes
        self.spread = spread
        self.clock = clock  # () -> virtual now (the simulator's)
        self.names = [s.name for s in states]
        self.main_states = list(states)
        self.engines = list(engines)
        if policies is None:
            policies = [create_policy(policy_name, seed=seed + k, **(policy_params or {}))
                        for k in range(processes)]  # the caller says whether they know K (router_processes)
        self.cores = [RoutingCore(p, stale_after_s) for p in policies]
        self.states = [[ReplicaState.create(s.name, s.url) for s in states] for _ in range(processes)]
        self.lookups = [{s.name: s for s in st} for st in self.states]
        for p, st in zip(policies, self.states, strict=True):
            for s in st:
                p.on_replica_added(s.name)
        self.stale_after_s = stale_after_s
        self._rng = random.Random(seed)
        self._next = 0
        self._owner: dict[str, int] = {}  # request id -> process
        self.sent = [0] * processes
        self.kv_events = kv_events
        self.announced = [AnnouncedCache() for _ in states]
        self.block_size = 16
        self.hash_seed = 0
        self.encoder = PromptEncoder()
        if kv_events:
            for eng in self.engines:
                sched = getattr(eng, "sched", None)
                if sched is None:
                    raise ValueError("kv_events needs the stepped engine (engine='exact'): the fast one "
                                     "publishes no events")
                sched.kv.enable_events(lambda rid: ())  # hashes are all we read; token ids stay empty
                self.block_size = sched.config.block_size
                self.hash_seed = sched.config.hash_seed

    # -- hooks ---------------------------------------------------------------------------------------

    def features(self, features: RequestFeatures, messages: Sequence[dict[str, Any]]) -> RequestFeatures:
        if not self.kv_events:
            return features
        return dataclasses.replace(features, kv_match=SimKVMatch(self, messages))  # type: ignore[arg-type]

    def polled(self) -> None:
        """The engines' reports (just stored in the simulator's states) reach every process."""
        for st in self.states:
            for mine, main in zip(st, self.main_states, strict=True):
                mine.load = main.load

    def step_done(self, i: int) -> None:
        """Engine ``i``'s step ended: the events it queued are published and applied."""
        if self.kv_events:
            self.announced[i].apply(self.engines[i].sched.kv.take_events())

    # -- the RoutingCore calls the simulator makes -------------------------------------------------

    def choose(self, features: RequestFeatures, candidates: Sequence[ReplicaState], *,
               views: Sequence[ReplicaView] | None = None, now: float | None = None,
               lookup: Mapping[str, ReplicaState] | None = None) -> Route:
        if self.spread == "round_robin":
            k = self._next
            self._next = (k + 1) % self.k
        else:
            k = self._rng.randrange(self.k) if self.k > 1 else 0
        self._owner[features.request_id] = k
        self.sent[k] += 1
        t = self.clock() if self.clock is not None else 0.0
        mine = self.states[k]
        own_views = [s.view(t, self.stale_after_s) for s in mine]
        return self.cores[k].choose(features, mine, views=own_views, lookup=self.lookups[k])

    def dispatch(self, route: Route, features: RequestFeatures, now: float | None = None) -> Lease:
        return self.cores[self._owner[features.request_id]].dispatch(route, features, now)

    def complete(self, route: Route, lease: Lease, features: RequestFeatures, outcome: Outcome, *,
                 health_failure: bool = False, now: float | None = None) -> None:
        k = self._owner.pop(features.request_id)
        self.cores[k].complete(route, lease, features, outcome, health_failure=health_failure, now=now)

