"""Summary statistics of a load-generator run: latency percentiles, throughput, goodput, hit rate, balance.

Latency percentiles are over successful requests only, so every summary also carries the failures
(by status, 429 and 503 on their own) and goodput, which counts a failed request as not good: a
contender that sheds load cannot look faster without its goodput and error columns showing it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.lib.loadgen import RequestRecord
from benchmarks.lib.stats import percentile


@dataclass(frozen=True)
class Slo:
    """A request is "good" if it succeeded with TTFT and TPOT at or under these bounds (seconds)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1


def tpot_s(r: RequestRecord) -> float | None:
    """Time per output token after the first: (E2E - TTFT) / (output tokens - 1)."""
    if r.ttft_s is None or r.output_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def pcts(values: Sequence[float], scale: float = 1e3, digits: int = 1) -> dict[str, float]:
    """p50/p90/p99 and mean of ``values`` x ``scale`` (milliseconds by default); NaN when empty."""
    v = [x * scale for x in values]
    mean = sum(v) / len(v) if v else math.nan
    return {k: round(x, digits) for k, x in (("p50", percentile(v, 0.5)), ("p90", percentile(v, 0.9)),
                                             ("p99", percentile(v, 0.99)), ("mean", mean))}


def imbalance(counts: Sequence[float]) -> float:
    """max/mean of per-replica work; 1.0 is perfect balance, N means everything on one of N replicas."""
    if not counts or sum(counts) == 0:
        return math.nan
    return max(counts) / (sum(counts) / len(counts))


def summarize_run(records: Sequence[RequestRecord], wall_s: float, slo: Slo = Slo(),
                  per_replica: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Everything the compare table shows, from the records of one run.

    ``per_replica`` (requests served per replica, e.g. from the engines' own counters) gives the share
    and max/mean; without it the router's ``x-router-replica`` header is used when present.
    """
    ok = [r for r in records if r.ok]
    statuses = Counter(r.status for r in records if not r.ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [t for r in ok if (t := tpot_s(r)) is not None]
    good = [r for r in ok if r.ttft_s is not None and r.ttft_s <= slo.ttft_s and (tpot_s(r) or 0.0) <= slo.tpot_s]
    prompt = sum(r.prompt_tokens for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    if per_replica is None:
        named = Counter(r.replica for r in ok if r.replica)
        per_replica = dict(named) if named else None
    counts = sorted(per_replica.items()) if per_replica else []
    total_served = sum(v for _, v in counts)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "status_429": statuses.get(429, 0),
        "status_503": statuses.get(503, 0),
        "failed_by_status": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall_s, 3),
        "ttft_ms": pcts(ttft),
        "tpot_ms": pcts(tpots),
        "itl_ms": pcts([g for r in ok for g in r.itl_s]),
        "e2e_ms": pcts([r.e2e_s for r in ok]),
        "req_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else math.nan,
        "output_tok_per_s": round(out_tokens / wall_s, 1) if wall_s > 0 else math.nan,
        "goodput_req_per_s": round(len(good) / wall_s, 3) if wall_s > 0 else math.nan,
        "good_share": round(len(good) / len(records), 4) if records else math.nan,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "hit_rate": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else math.nan,
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "per_replica": {k: v for k, v in counts},
        "replica_share": {k: round(v / total_served, 4) for k, v in counts} if total_served else {},
        "max_over_mean": round(imbalance([v for _, v in counts]), 3) if counts else math.nan,
        "error_samples": [f"{r.status}: {r.error}" for r in records if not r.ok][:3],
    }
