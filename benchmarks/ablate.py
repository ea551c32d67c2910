"""What each part of our router costs per streamed request: the router with parts taken out, side by side.

    python -m benchmarks.ablate                                   # every ablation, ~3 min
    python -m benchmarks.ablate --variants base,no-usage,floor --requests 1000

Every variant is our router (policy ``--policy``) in front of the same 2 `instant` engines, started with
some parts taken out in its own process (`benchmarks.lib.ablations`: metrics, prompt features,
access-control middlewares, reading the body before admission, admin routes, polling, usage reading,
outcome feedback, or the whole handler replaced by the floor relay's); ``floor`` is the bare aiohttp relay
(`benchmarks.lib.floor_relay`). Ablations join with ``+`` (``no-metrics+no-usage``). Requests take turns
one by one (request i goes to direct or to one variant, in turn), as `benchmarks.overhead --interleave`
does, so a shared host's bursts fall on every variant alike; a variant's CPU is its router process's.
Reported per variant: router CPU s per 1,000 streamed requests and added TTFT p50, and both minus
``base``'s: what that part costs. Each router serves a fifth or less of the time it runs, so its caches
are colder than a lone router's and every figure is higher than `benchmarks.overhead`'s; compare
variants within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.lib.ablations import ABLATIONS
from benchmarks.lib.client import client_session
from benchmarks.lib.comma import comma_list, positive_int
from benchmarks.lib.defaults import RESULTS_DIR
from benchmarks.lib.fleet import EngineSpec, Fleet
from benchmarks.lib.report import format_table, machine_info, run_benchmark
from benchmarks.lib.routers import Contender, floor_contender
from benchmarks.overhead import measure_level, start_contenders
from router.policies.registry import POLICY_NAMES

DEFAULT_VARIANTS = ["base", *ABLATIONS, "floor"]


def variant(text: str) -> str:
    """``base``, ``floor``, or known ablations joined by ``+``."""
    if text not in ("base", "floor"):
        unknown = [p for p in text.split("+") if p not in ABLATIONS]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown ablation {unknown[0]!r}; choose from base, floor, "
                                             f"{', '.join(ABLATIONS)} (joined by +)")
    return text


def contender(name: str, policy: str) -> Contender:
    if name == "floor":
        return floor_contender()
    parts = () if name == "base" else tuple(name.split("+"))
    return Contender(name=name, kind="ours", policy=policy, ablations=parts,
                     notes="; ".join(ABLATIONS[p][0] for p in parts))


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ablate-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        async with (Fleet(args.engines, EngineSpec(profile="instant"), None, log_dir=log_dir) as fleet,
                    client_session() as session, contextlib.AsyncExitStack() as stack):
            started = await start_contenders(stack, [contender(v, args.policy) for v in args.variants], fleet,
                                             args, log_dir)
            running = [(row, r) for row, r in started if r is not None]
            await measure_level(session, fleet, running, 1, args)
    return {"benchmark": "ablate", "policy": args.policy, "engines": args.engines,
            "variants": [row for row, _ in started]}


def table(res: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    base = next((v for v in res["variants"] if v["name"] == "base" and v["levels"]), None)
    base_cpu = base["levels"][0]["router"]["cpu_s_per_1k"]["router"] if base else None
    base_ttft = base["levels"][0]["added_ms"]["ttft_p50"] if base else None
    for v in res["variants"]:
        if not v["levels"]:
            rows.append([v["name"], "", "", "", "", "ERROR: " + (v["error"] or "?").splitlines()[0][:90]])
            continue
        level = v["levels"][0]
        cpu, ttft = level["router"]["cpu_s_per_1k"]["router"], level["added_ms"]["ttft_p50"]
        rows.append([v["name"], cpu, "" if base_cpu is None else round(cpu - base_cpu, 3), ttft,
                     "" if base_ttft is None else round(ttft - base_ttft, 3), level["router"]["errors"]])
    return format_table(["variant", "router CPU s/1k", "vs base", "added TTFT p50 ms", "vs base", "errors"], rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablate",
                                description=__doc__.split("\n\n")[0] if __doc__ else None,
                                epilog="ablations: " + "; ".join(f"{k}: {w}" for k, (w, _) in ABLATIONS.items()))
    p.add_argument("--variants", type=comma_list(variant), default=",".join(DEFAULT_VARIANTS),
                   help="base, floor, or ablations joined by + (default: base, each ablation, floor)")
    p.add_argument("--policy", default="cost", choices=POLICY_NAMES, help="policy of every variant")
    p.add_argument("--requests", type=positive_int, default=3000, help="measured streamed requests per variant "
                   "and round")
    p.add_argument("--rounds", type=positive_int, default=1, help="rounds, pooled")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured requests per variant first")
    p.add_argument("--engines", type=positive_int, default=2, help="sim engine subprocesses (profile `instant`)")
    p.add_argument("--max-s", type=float, default=300.0, help="time cap per measurement")
    p.add_argument("--start-timeout-s", type=float, default=60.0, help="how long a router may take to route")
    p.add_argument("--log-dir", default=None, help="keep router and engine logs here (default: a temp dir)")
    p.add_argument("--out", default=str(RESULTS_DIR / "ablate.json"), help="JSON output path")
    p.set_defaults(interleave=True)  # always request by request (`benchmarks.overhead.measure_level`)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def run() -> dict[str, Any]:
        info = machine_info()
        out = {**await amain(args), "machine": info, "args": {k: v for k, v in vars(args).items() if k != "out"}}
        print(f"\nrouter parts ablated: policy {args.policy}, 1 stream, requests interleaved; CPU s per 1,000 "
              "streamed requests; 'vs base' = what taking the part out saved (negative) or cost")
        print(table(out))
        return out

    return run_benchmark(run, Path(args.out))


if __name__ == "__main__":
    raise SystemExit(main())
