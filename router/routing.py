"""The routing step, pure and I/O-free: views -> policy choice -> lease + on_dispatch -> outcome -> feedback.

Why one place: the live `router.dispatch.Dispatcher` (HTTP, retries, relaying) and the offline fleet
simulator (`benchmarks.sim_loop`, virtual time) route through this same code over the same
`ReplicaState` / `Lease` / policy objects, so a change to routing is made once and judged by both.

One request, as both callers drive it::

    route = core.choose(features, candidates)          # or views=..., lookup=... for cached views
    lease = core.dispatch(route, features, now)        # counters taken, policy.on_dispatch
    ...                                                # lease.first_token() when prefill is done
    core.complete(route, lease, outcome, now=now)      # health verdict, usage, on_complete, release

Clocks: every ``now`` is the caller's (``time.monotonic()`` live, virtual seconds in the simulator);
``None`` means ``time.monotonic()``. Nothing here awaits, logs per request, or touches a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from router.features.parse import RequestFeatures
from router.policies.base import Decision, Outcome, Policy
from router.replica_view import LazyViews, ReplicaView
from router.replicas.state import DEFAULT_STALE_AFTER_S, Lease, ReplicaState

LAZY_VIEWS_ABOVE = 64  # replicas; below, one list comprehension is cheaper than on-demand views

log = logging.getLogger("router.routing")

DecisionHook = Callable[[Decision, float], None]  # (decision, seconds choose() took)


@dataclass(frozen=True, slots=True)
class Route:
    """A decision and the replica record it names (``decision.replica == replica.name``)."""

    decision: Decision
    replica: ReplicaState


def failure(status: int, error_kind: str, ttft_s: float | None = None) -> Outcome:
    """The outcome of an attempt that ended without a usable answer (no usage numbers)."""
    return Outcome(ok=False, status=status, ttft_s=ttft_s, error_kind=error_kind)


class RoutingCore:
    """One policy over `ReplicaState`s. ``on_decision`` (optional) sees every decision and its latency,
    which is how the live router feeds its metrics without this module knowing of them."""

    __slots__ = ("policy", "stale_after_s", "on_decision")

    def __init__(self, policy: Policy, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 on_decision: DecisionHook | None = None) -> None:
        self.policy = policy
        self.stale_after_s = stale_after_s
        self.on_decision = on_decision

    def views(self, candidates: Sequence[ReplicaState], now: float) -> Sequence[ReplicaView]:
        """The candidates as the policy sees them at ``now`` (`ReplicaState.view`). A large fleet's views
        are built as the policy reads them (cost reads only its candidates')."""
        stale = self.stale_after_s
        if len(candidates) > LAZY_VIEWS_ABOVE:
            return LazyViews(candidates, now, stale)
        return [r.view(now, stale) for r in candidates]

    def choose(self, features: RequestFeatures, candidates: Sequence[ReplicaState], *,
               views: Sequence[ReplicaView] | None = None, now: float | None = None,
               lookup: Mapping[str, ReplicaState] | None = None) -> Route:
        """Ask the policy. ``views`` may be passed when the caller keeps them current itself (the
        simulator rebuilds a replica's view only when that replica changes); ``lookup`` maps names to
        ``candidates`` to skip a scan. A policy naming no candidate falls back to the first one: a policy
        bug must not take the request down."""
        mine = views is None  # built here over ``candidates``: a lazy one can say where a view came from
        if views is None:
            views = self.views(candidates, time.monotonic() if now is None else now)
        hook = self.on_decision
        if hook is None:
            decision = self.policy.choose(features, views)
        else:
            t0 = time.perf_counter()
            decision = self.policy.choose(features, views)
            hook(decision, time.perf_counter() - t0)
        name = decision.replica
        if lookup is not None:
            chosen = lookup.get(name)
        else:
            at = views.index_of(name) if mine and isinstance(views, LazyViews) else None
            if at is not None and candidates[at].name == name:
                chosen = candidates[at]
            else:
                chosen = next((r for r in candidates if r.name == name), None)
        if chosen is None:
            log.error("policy %s chose unknown replica %r", self.policy.name, name)
            chosen = candidates[0]
            decision = Decision(replica=chosen.name, reason="fallback")
        return Route(decision, chosen)

    def dispatch(self, route: Route, features: RequestFeatures, now: float | None = None) -> Lease:
        """Commit: the replica's in-flight counters are taken (released by `complete`, or by the lease
        itself on any other exit) and the policy records the request. Call before the next ``await``."""
        lease = route.replica.lease(features.token_estimate, now)
        self.policy.on_dispatch(features, route.decision)
        return lease

    def complete(self, route: Route, lease: Lease, features: RequestFeatures, outcome: Outcome, *,
                 health_failure: bool = False, now: float | None = None) -> None:
        """The attempt's one outcome: the health verdict (a failure only when the replica is to blame,
        a success when it answered 200), the engine's token usage, the policy's feedback, then the lease
        is released. Policy errors are logged, never raised: feedback must not break the response."""
        if health_failure:
            lease.record_failure(outcome.error_kind or "error", now)
        elif outcome.ok:
            lease.record_success(now)
        route.replica.record_usage(outcome.prompt_tokens, outcome.cached_tokens)
        try:
            self.policy.on_complete(features, route.decision, outcome)
        except Exception:
            log.exception("policy %s on_complete failed", self.policy.name)
        lease.release(now)
