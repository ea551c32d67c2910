"""Order statistics the benchmarks report (one definition of a percentile for every table)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation between order statistics; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max of ``values`` times ``scale`` (e.g. 1e3 for ms), rounded."""
    if not values:
        return {"n": 0}
    v = [x * scale for x in values]
    out = {"mean": sum(v) / len(v), "p50": percentile(v, 0.5), "p90": percentile(v, 0.9),
           "p99": percentile(v, 0.99), "max": max(v)}
    return {"n": len(v), **{k: round(x, digits) for k, x in out.items()}}
