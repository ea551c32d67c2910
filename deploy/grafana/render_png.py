"""Render a dashboard's panels to a PNG with matplotlib, from a real Prometheus (Grafana is not packaged
for Debian, so the README's picture is drawn from the same queries Grafana would run).

Each panel of generate_dashboards.DASHBOARDS becomes one subplot: its queries over the last --minutes,
legends from the queries' legendFormat, units as the panel's.

    python deploy/grafana/render_png.py --prometheus http://127.0.0.1:9090 --dashboard prefix-router \\
        --out docs/img/dashboard-router.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_dashboards as dashboards  # noqa: E402


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def render(prom: str, stem: str, out: Path, minutes: float, rate_interval: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, title, rows = dashboards.DASHBOARDS[stem]
    panels = [p for row in rows for p in row.panels]
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(14, 3.1 * nrows), squeeze=False)
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for q in panel.queries:
            for series in query_range(prom, q.expr.replace("$__rate_interval", rate_interval), start, end, step):
                xs = [(float(t) - end) / 60 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if panel.unit == "percentunit":
                    ys = [y * 100 for y in ys]
                ax.plot(xs, ys, linewidth=1.2, label=legend(q.legend, series["metric"]))
        unit = {"percentunit": "%", "reqps": "req/s", "ops": "per s", "s": "seconds"}.get(panel.unit, "")
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_xlim(-minutes, 0)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("minutes ago", fontsize=8)
    fig.suptitle(f"{title} (rendered from Prometheus with matplotlib)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL")
    ap.add_argument("--dashboard", choices=sorted(dashboards.DASHBOARDS), default="prefix-router")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0, help="time range (default 10)")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    args = ap.parse_args(argv)
    render(args.prometheus.rstrip("/"), args.dashboard, args.out, args.minutes, args.rate_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
