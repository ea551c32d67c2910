"""PNG plots of a compare result: TTFT percentiles, hit rate against the oracle, imbalance, TTFT vs load.

One figure per workload, one bar (or line) per contender; our default policy is drawn in a strong
colour, our other policies in blue tones, other routers in orange tones, so the reader can tell at a
glance who is who. Needs matplotlib (the ``bench`` extra); it draws off-screen (Agg).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _colour(row: dict[str, Any], default: str) -> str:
    if row["contender"] == default:
        return "#1b7837"
    return "#4393c3" if row["kind"] == "ours" else "#f4a582" if row["kind"] == "sglang-router" else "#d6604d"


def plot_compare(res: dict[str, Any], path: Path, default: str = "cost") -> Path:
    """Write the figure for one workload's compare result to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "summary" in r and r["summary"]["ok"]]
    loads = list(dict.fromkeys(r["load"] for r in rows))
    last = loads[-1] if loads else None
    at = [r for r in rows if r["load"] == last]
    names = [r["contender"] for r in at]
    colours = [_colour(r, default) for r in at]
    panels = 4 if len(loads) > 1 else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.8 + 0.12 * len(names)), squeeze=False)
    ax = axes[0]
    y = range(len(at))

    # TTFT p99, p90 and p50 drawn over each other on one horizontal bar per contender
    for key, alpha in (("p99", 0.35), ("p90", 0.7), ("p50", 1.0)):
        ax[0].barh(list(y), [r["summary"]["ttft_ms"][key] for r in at], color=colours, alpha=alpha,
                   label=key)
    ax[0].set_yticks(list(y), names)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("TTFT (ms): p50 dark, p90, p99 light")
    ax[0].set_title(f"TTFT at {last}")

    hit = [r["summary"]["hit_rate"] for r in at]
    ax[1].barh(list(y), hit, color=colours)
    ax[1].axvline(res["oracle"]["hit_rate"], color="black", linestyle="--", label="oracle")
    ax[1].set_yticks(list(y), [])
    ax[1].invert_yaxis()
    ax[1].set_xlim(0, 1)
    ax[1].set_xlabel("cluster hit rate (cached / prompt tokens)")
    ax[1].set_title("prefix-cache hit rate")
    ax[1].legend(loc="lower right")

    imb = [r["summary"]["max_over_mean"] for r in at]
    ax[2].barh(list(y), [0 if math.isnan(v) else v for v in imb], color=colours)
    ax[2].axvline(1.0, color="black", linestyle=":")
    ax[2].set_yticks(list(y), [])
    ax[2].invert_yaxis()
    ax[2].set_xlabel(f"max / mean requests per replica (1 = even, {res['engines']} = all on one)")
    ax[2].set_title("imbalance")

    if panels == 4:
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = [(r["load_value"], r["summary"]["ttft_ms"]["p90"]) for r in rows if r["contender"] == name]
            row = next(r for r in rows if r["contender"] == name)
            ax[3].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=_colour(row, default),
                       linewidth=2.5 if name == default else 1.2, label=name)
        mode = rows[0]["mode"]
        ax[3].set_xlabel("offered load (" + ("sessions/s" if mode == "rate" else "concurrent clients") + ")")
        ax[3].set_ylabel("TTFT p90 (ms)")
        p90s = [r["summary"]["ttft_ms"]["p90"] for r in rows]
        if min(p90s) > 0 and max(p90s) / min(p90s) > 10:  # a collapsed contender: keep the others readable
            ax[3].set_yscale("log")
        ax[3].set_title("TTFT p90 vs load")
        ax[3].legend(fontsize=7)
    fig.suptitle(f"{res['workload']}: {res['requests']} requests, {res['engines']} engines, "
                 f"{res['kv_blocks_per_replica']} KV blocks each (green: our default; blue: ours; orange/red: "
                 "other routers)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
