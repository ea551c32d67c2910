"""Where a prompt goes when the costs do not tell the replicas apart, so that router processes agree.

Why: with several router processes (``--workers K``, or pods behind a Service) each process sees the
engines' load reports (shared, but up to a poll old) and only its *own* requests in flight. A burst of
requests sharing a new prefix (a new group's system prompt, an agent's tool prompt) reaches several
processes before any engine has announced the prefix's blocks; each process prices the replicas by its
partial load view, the burst scatters and every replica pays the prefill. And requests priced on the same
stale view herd onto the same "least loaded" replica.

The rule: costs within ``margin`` of the cheapest do not tell the replicas apart (the margin is what this
process cannot see, below); among those near-cheapest replicas the cache decides, then agreement:

- when every replica holds the same leading blocks of the prompt as far as this process knows (the KV
  events, the approximate index and its own requests in flight), usually none, the choice is about load
  alone: the near-cheapest replica that ranks first by rendezvous hashing of the prompt's first blocks
  past that common part (``AGREE_TOKENS`` worth). Every process ranks the replicas alike for the same
  prefix, so a burst agrees on one replica, while different prefixes spread over the near-cheapest
  replicas instead of herding;
- when a near-cheapest replica holds more of the prompt than the cheapest, it keeps the prompt (the
  deepest match, then the cheaper). Without this, one request of this process queued at a holder (priced
  N times, `router.policies.cost`'s ``router_processes``) sent the holder's next siblings elsewhere to
  recompute the prefix: 21 of K=4's 22 misses past the groups' first requests (K=1: 2) in the
  simulator's llmd-8b gsp run (seed 1), and gsp's TTFT p90 sits where its misses begin, so a few more
  misses move it (``benchmarks.processes``, docs/kv_events.md);
- otherwise (the cheapest holds the deepest match, or the holders are dearer than the margin) the costs
  decide, as with one process.

``margin`` is what this process cannot see: with N router processes (the policy's ``router_processes``,
which the operator or ``--workers N`` states) it has ``1/N`` of the fleet's requests, so the other
``1 - 1/N`` of the load is invisible to it for up to a poll; the margin is that share of the prompt's own
prefill cost (what one more request in the queue ahead would cost, and what scattering makes each
sibling of a new prefix pay). A lone router (N = 1, the default) is never affected. Estimating the
unseen share from the engines' reports (running + waiting beyond this process's own requests) was tried:
a report is a poll old, so a lone router saw requests that had finished since as "unseen" and its
decisions moved (the simulator's matrix, ``benchmarks.sim_processes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import xxhash

from router.replica_view import ReplicaView

# Tokens of the prompt (past what every replica holds) that name its prefix for agreement: enough to tell
# prompts that only share a stock preamble apart, well under a shared system or tool prompt.
AGREE_TOKENS = 256


def rank(key: int, name: str) -> int:
    """Rendezvous score of ``name`` for a prefix ``key``: the same in every process, for every fleet."""
    return xxhash.xxh64_intdigest(name.encode(), seed=key & 0xFFFFFFFFFFFFFFFF)


def agree(hashes: Sequence[int], block_tokens: float, priced: Sequence[ReplicaView], costs: Mapping[str, float],
          matched: Mapping[str, int], prefill_s: Callable[[int], float], processes: int) -> ReplicaView | None:
    """The replica the rule of the module docstring picks for this prompt among the near-cheapest, or None
    when the costs decide: one process, the cheapest holds the deepest match among them, a holder is
    dearer than the margin, or no prompt past the common part. ``prefill_s(common_blocks)`` is the
    prompt's own prefill cost past the blocks every replica holds."""
    if processes < 2 or len(priced) < 2 or not hashes:
        return None
    held = {v.name: matched.get(v.name, 0) for v in priced}
    common = min(held.values())
    if common >= len(hashes):
        return None
    share = 1.0 - 1.0 / processes
    cheapest = min(priced, key=lambda v: costs[v.name])
    ceiling = costs[cheapest.name] + share * prefill_s(common)
    near = [v for v in priced if costs[v.name] <= ceiling]
    deepest = max(held[v.name] for v in near)
    if deepest != common:  # the cache tells the near-cheapest apart
        if held[cheapest.name] == deepest:
            return None
        return min((v for v in near if held[v.name] == deepest), key=lambda v: costs[v.name])
    if max(held.values()) != common:  # the holders are dearer than the margin
        return None
    if len(near) == 1:
        return near[0]
    depth = min(len(hashes), common + max(1, math.ceil(AGREE_TOKENS / max(block_tokens, 1e-9))))
    key = hashes[depth - 1]
    return max(near, key=lambda v: rank(key, v.name))
