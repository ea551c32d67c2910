"""Where a prompt goes when the cache does not tell the replicas apart, so that router processes agree.

Why: with several router processes (``--workers K``, or pods behind a Service) each process sees the
engines' load reports (shared, but up to a poll old) and only its *own* requests in flight. A burst of
requests sharing a new prefix (a new group's system prompt, an agent's tool prompt) reaches several
processes before any engine has announced the prefix's blocks; each process prices the replicas by its
partial load view, the burst scatters and every replica pays the prefill. And requests priced on the same
stale view herd onto the same "least loaded" replica.

The rule: when every replica holds the same leading blocks of the prompt as far as this process knows
(the KV events, the approximate index and its own requests in flight), usually none, the choice is about
load alone. Then pick, among the replicas whose cost is within ``margin`` of the cheapest, the one that
ranks first by rendezvous hashing of the prompt's first blocks past that common part (``AGREE_TOKENS``
worth): every process ranks the replicas alike for the same prefix, so a burst agrees on one replica,
while different prefixes spread over the near-cheapest replicas instead of herding.

``margin`` is what this process cannot see: the share of the engines' reported requests that are not
its own (`unseen_share`; at least ``1 - 1/N`` when the number of processes N is configured) times the prompt's own prefill cost (what one more request in the queue ahead
would cost, and what scattering makes every sibling pay). A lone router sees all requests, the share is
0 and the rule never applies: one process decides as before (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import xxhash

from router.replica_view import ReplicaView

# Tokens of the prompt (past what every replica holds) that name its prefix for agreement: enough to tell
# prompts that only share a stock preamble apart, well under a shared system or tool prompt.
AGREE_TOKENS = 256


def unseen_share(views: Sequence[ReplicaView]) -> float:
    """Share of the requests the engines report (running + waiting, fresh reports only) that this process
    does not have in flight there: the other processes' traffic, as far as the reports show it."""
    total = unseen = 0.0
    for v in views:
        if v.load_age_s is None:  # no fresh report: nothing to compare with
            continue
        engine = float(v.running + v.waiting)
        total += engine
        unseen += max(0.0, engine - v.in_flight_requests)
    return unseen / total if total > 0 else 0.0


def rank(key: int, name: str) -> int:
    """Rendezvous score of ``name`` for a prefix ``key``: the same in every process, for every fleet."""
    return xxhash.xxh64_intdigest(name.encode(), seed=key & 0xFFFFFFFFFFFFFFFF)


def agree(hashes: Sequence[int], block_tokens: float, priced: Sequence[ReplicaView], costs: Mapping[str, float],
          matched: Mapping[str, int], prefill_s: Callable[[int], float], processes: int = 1) -> ReplicaView | None:
    """The replica every process would pick for this prompt (see the module docstring), or None when the
    rule does not apply: the cache tells replicas apart, no prompt past the common part, nothing unseen.
    ``prefill_s(common_blocks)`` is the prompt's own prefill cost past the blocks every replica holds;
    ``processes``, when known (``--workers N``), bounds the unseen share from below by ``1 - 1/N``, which
    is what lets the rule act at a cold start, before any load report shows the other processes."""
    if len(priced) < 2 or not hashes:
        return None
    held = [matched.get(v.name, 0) for v in priced]
    common = min(held)
    if max(held) != common or common >= len(hashes):
        return None
    share = max(unseen_share(priced), 1.0 - 1.0 / processes if processes > 1 else 0.0)
    if share <= 0.0:
        return None
    ceiling = min(costs[v.name] for v in priced) + share * prefill_s(common)
    near = [v for v in priced if costs[v.name] <= ceiling]
    if len(near) == 1:
        return near[0]
    depth = min(len(hashes), common + max(1, math.ceil(AGREE_TOKENS / max(block_tokens, 1e-9))))
    key = hashes[depth - 1]
    return max(near, key=lambda v: rank(key, v.name))
