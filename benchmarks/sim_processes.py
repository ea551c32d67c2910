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

K=1 without events routes exactly as the plain simulator does (a test checks it). Only the stepped engine
(``engine="exact"``) publishes events; the fast engine has no event queue, so ``kv_events`` needs it.
"""

from __future__ import annotations

import dataclasses
import inspect
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
SIZED = {"gsp": "groups", "multiturn": "conversations", "agentic": "sessions"}  # what --size multiplies


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


# -- the command line: K processes vs one, per engine and workload ------------------------------------


def run_cell(engine: str, workload: str, policy: str, params: Mapping[str, Any], processes: int, seed: int,
             concurrency: int, spread: str, size: int = 1) -> dict[str, Any]:
    """One simulated run of a matrix cell (`benchmarks.matrix`'s engines and cache sizes)."""
    from benchmarks.lib import workloads as wl
    from benchmarks.lib.loadgen import LoadSpec
    from benchmarks.matrix import CAPACITY, REPLICAS, profiles, workload_of
    from benchmarks.sim_loop import simulate

    if size > 1:  # more sessions of the same shape: p90s of a few hundred requests are too noisy
        field = SIZED[workload]
        default = inspect.signature(getattr(wl, workload)).parameters[field].default
        w = wl.build(workload, seed=seed, **{field: default * size})[0]
    else:
        w = workload_of(workload, seed)
    kv = wl.kv_blocks_per_replica(w, REPLICAS, CAPACITY.get(engine, 1.3))
    load = LoadSpec(concurrency=concurrency, max_requests=w.num_requests, seed=seed)
    s = simulate(w, REPLICAS, policy, dict(params), profile=profiles(engine), num_blocks=kv, load=load,
                 seed=seed, router_processes=processes, kv_events=policy != "cost" or "index" in params,
                 spread=spread).summary()
    return {"hit_rate": s["hit_rate"], "ttft_p90_ms": s["ttft_ms"]["p90"], "requests": s["requests"],
            "failed": s["failed"], "max_over_mean": s["max_over_mean"]}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    import time
    from pathlib import Path
    from statistics import mean

    from benchmarks.lib.cli_help import DefaultsHelpFormatter
    from benchmarks.lib.defaults import RESULTS_DIR
    from benchmarks.lib.report import format_table, machine_info, write_json

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sim_processes", formatter_class=DefaultsHelpFormatter,
        description="K router processes vs one in the offline simulator: hit rate and TTFT p90 ratios per "
                    "matrix engine and workload (issue 14: K=4 keeps >= 0.95x the hit rate, TTFT p90 within "
                    "10 %).")
    p.add_argument("--engines", default="llmd-8b,slow-prefill,tiny-seqs,small-kv")
    p.add_argument("--workloads", default="gsp,multiturn,agentic")
    p.add_argument("--policy", default="precise", help="policy name (precise and cost+index get KV events)")
    p.add_argument("--params", default="{}", help="policy params as JSON")
    p.add_argument("--processes", type=int, default=4, help="K, compared with 1")
    p.add_argument("--seeds", default="1,2,3", help="comma list; ratios are of the seeds' means")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--spread", choices=SPREADS, default="random")
    p.add_argument("--size", type=int, default=1,
                   help="x this many sessions (gsp groups, multiturn conversations, agentic sessions)")
    p.add_argument("--tell-processes", action="store_true",
                   help="pass router_processes=K to the K policies (as --workers K would)")
    p.add_argument("--out", default=None, help="JSON path (default results/sim-processes-<policy>.json)")
    args = p.parse_args(argv)
    params = json.loads(args.params)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.process_time()
    rows, cells = [], []
    for engine in args.engines.split(","):
        for workload in args.workloads.split(","):
            runs = {k: [run_cell(engine, workload, args.policy,
                                 {**params, "router_processes": k} if args.tell_processes else params,
                                 k, s, args.concurrency, args.spread, args.size)
                        for s in seeds] for k in (1, args.processes)}
            avg = {k: {m: mean(r[m] for r in rs) for m in ("hit_rate", "ttft_p90_ms")} for k, rs in runs.items()}
            one, many = avg[1], avg[args.processes]
            hit = many["hit_rate"] / one["hit_rate"] if one["hit_rate"] else float("nan")
            ttft = many["ttft_p90_ms"] / one["ttft_p90_ms"] if one["ttft_p90_ms"] else float("nan")
            cells.append({"engine": engine, "workload": workload, "runs": runs, "hit_ratio": round(hit, 3),
                          "ttft_p90_ratio": round(ttft, 3)})
            rows.append([engine, workload, round(one["hit_rate"], 3), round(many["hit_rate"], 3), round(hit, 3),
                         round(one["ttft_p90_ms"]), round(many["ttft_p90_ms"]), round(ttft, 3),
                         "yes" if hit >= 0.95 and ttft <= 1.10 else "NO"])
            print(format_table(HEADERS(args.processes), rows[-1:]), flush=True)
    print()
    print(format_table(HEADERS(args.processes), rows))
    cpu = time.process_time() - t0
    print(f"\n{args.policy} {params or ''}, seeds {args.seeds}, spread {args.spread}; {cpu:.1f} CPU s")
    out = Path(args.out) if args.out else RESULTS_DIR / f"sim-processes-{args.policy}.json"
    write_json(out, {"machine": machine_info(), "policy": args.policy, "params": params,
                     "processes": args.processes, "tell_processes": args.tell_processes, "size": args.size,
                     "seeds": seeds, "spread": args.spread,
                     "concurrency": args.concurrency, "cpu_s": round(cpu, 1), "cells": cells})
    print(f"wrote {out}")
    return 0


def HEADERS(k: int) -> list[str]:  # noqa: N802 - a table header, named like the others
    return ["engine", "workload", "hit 1p", f"hit {k}p", "ratio", "ttft p90 1p", f"ttft p90 {k}p", "ratio",
            "goal met"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
