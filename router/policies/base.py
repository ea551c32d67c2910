"""The policy contract: decide synchronously, then commit on dispatch, then learn on completion.

Lifecycle of one request, as the dispatcher (`router.dispatch`, or the simulator) drives it:

1. ``choose(features, replicas)`` with the eligible replicas (healthy, serving the model; never empty).
   Pure as far as request state goes: it may refresh bookkeeping derived from the views (ring
   membership, index capacities), but it records nothing about this request.
2. ``on_dispatch(features, decision)`` once the dispatcher commits to sending there. Index updates happen
   here, so a request that is never sent (the dispatcher gave up, the replica vanished) leaves no trace.
   The dispatcher should call it before its next ``await`` after ``choose`` so that concurrent decisions see
   each other.
3. ``on_complete(features, decision, outcome)`` exactly once per dispatched request, success or not.

Replica membership changes arrive through ``on_replica_added`` / ``on_replica_removed``; policies must
also cope with a name they have never heard of appearing in ``replicas``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from router.features.parse import RequestFeatures
from router.replica_view import ReplicaView


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why. ``reason`` is a small fixed label per policy (counted in metrics);
    ``matched_blocks`` is the prefix length the policy believed the chosen replica holds;
    ``scores`` optionally carries per-replica numbers for debugging (meaning depends on the policy)."""

    replica: str
    reason: str
    matched_blocks: int = 0
    scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a dispatched request ended. Token counts are the engine's ``usage`` numbers when known;
    ``cached_tokens`` is ``usage.prompt_tokens_details.cached_tokens``. ``ttft_s`` is None when no
    first token was seen (the prompt was probably never prefilled). ``e2e_s`` is the whole request's time
    as the router saw it (equal to ``ttft_s`` for a non-streamed answer)."""

    ok: bool
    status: int
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error_kind: str | None = None
    e2e_s: float | None = None


@runtime_checkable
class Policy(Protocol):
    """What the dispatcher calls. Synchronous, no I/O."""

    name: str

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision: ...

    def on_dispatch(self, features: RequestFeatures, decision: Decision) -> None: ...

    def on_complete(self, features: RequestFeatures, decision: Decision, outcome: Outcome) -> None: ...

    def on_replica_added(self, name: str) -> None: ...

    def on_replica_removed(self, name: str) -> None: ...


class PolicyBase:
    """No-op hooks plus the injectable random source every policy uses for tie-breaks.

    seed / rng: pass ``rng`` to share a `random.Random`, or ``seed`` for a private deterministic one;
    with neither, tie-breaks are unseeded.
    """

    name = "base"

    def __init__(self, *, seed: int | None = None, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random(seed)

    def choose(self, features: RequestFeatures, replicas: Sequence[ReplicaView]) -> Decision:
        raise NotImplementedError

    def on_dispatch(self, features: RequestFeatures, decision: Decision) -> None:
        return None

    def on_complete(self, features: RequestFeatures, decision: Decision, outcome: Outcome) -> None:
        return None

    def on_replica_added(self, name: str) -> None:
        return None

    def on_replica_removed(self, name: str) -> None:
        return None


T = TypeVar("T")


def require_replicas(replicas: Sequence[ReplicaView]) -> None:
    """Fail loudly on the one precondition the dispatcher owns."""
    if not replicas:
        raise ValueError("choose() needs at least one eligible replica")


def pick_lowest(items: Sequence[T], key: Callable[[T], object], rng: random.Random) -> T:
    """The item with the smallest ``key``; ties are broken by ``rng`` (no draw when there is no tie)."""
    best_key = None
    best: list[T] = []
    for item in items:
        k = key(item)
        if best_key is None or k < best_key:  # type: ignore[operator]
            best_key, best = k, [item]
        elif k == best_key:
            best.append(item)
    return best[0] if len(best) == 1 else rng.choice(best)
