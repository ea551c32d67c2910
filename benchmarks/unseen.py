"""The default policy on engines nobody tuned it for: random engine profiles, drawn with a seed.

    python -m benchmarks.unseen                          # 16 engines x 4 workloads, seed 1, closed loop (~1 CPU min)
    python -m benchmarks.unseen --engines-n 20 --seed 2 --poisson 0.75
    python -m benchmarks.unseen --debug                  # + the cost policy's extreme priced constants
    python -m benchmarks.unseen --size 4                 # 4x the sessions per cell (~4 CPU min)

`benchmarks.matrix`'s seven engines are the ones the default `cost` was developed against; a pathology
none of them shows (a 135 s shared decode step) was found by chance. This draws fleets log-uniformly
over wide, physically plausible ranges (`RANGES`; a third of them with one replica 1.5-3x slower), so
that corners no one picked get exercised. Each cell is `matrix.run_cell` with the drawn fleet
registered under its name; per cell cost's TTFT p90 against the best other contender and cache_aware,
hit rate against the oracle, max/mean; then the summary and the worst cells with their engines.
Writes benchmarks/results/unseen.json. At the default size a cell's p90 rests on a handful of its
~100-400 requests, so a single cell's ratio can be far off (u3-01 multiturn: 1.95x at size 1, the best
policy at size 4); ``--size`` is for checking a cell before acting on it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import matrix
from benchmarks.lib.comma import comma_list
from benchmarks.lib.defaults import RESULTS_DIR
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.lib.workloads import NAMES
from engine_server.sim import timing
from engine_server.sim.timing import MS, US, TimingProfile, slowed

# (low, high) of each log-uniform draw; times in seconds.
RANGES: dict[str, tuple[float, float]] = {
    "request_overhead_s": (0.5 * MS, 200 * MS), "prefill_per_token_s": (2 * US, 1000 * US),
    "decode_step_s": (2 * MS, 80 * MS), "decode_per_seq_s": (0.005 * MS, 10 * MS),
    "max_num_seqs": (2, 256), "kv_capacity": (0.3, 2.0), "slow_factor": (1.5, 3.0),
}
SLOW_REPLICA_P = 1 / 3
CONTENDERS = ("cost", "cost-pinned", "round_robin", "least_load", "consistent_hash", "cache_aware")


@dataclass(frozen=True, slots=True)
class DrawnEngine:
    """One random fleet: every replica the same profile, except optionally the last one slower."""

    name: str
    request_overhead_s: float
    prefill_per_token_s: float
    decode_step_s: float
    decode_per_seq_s: float
    max_num_seqs: int
    kv_capacity: float
    slow_factor: float | None = None

    def profile(self) -> TimingProfile:
        """The step model splits the per-request overhead and the decode step so that the cost policy's
        true constants (`TimingProfile.cost_constants`) are exactly the drawn ones."""
        return TimingProfile(
            name=self.name, description="drawn by benchmarks.unseen", prefill_overhead_s=self.request_overhead_s,
            prefill_per_token_s=self.prefill_per_token_s, decode_overhead_s=self.decode_step_s,
            decode_per_seq_s=self.decode_per_seq_s, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=4096, max_model_len=8192)

    def profiles(self) -> list[TimingProfile]:
        base = self.profile()
        fleet = [base] * matrix.REPLICAS
        if self.slow_factor:
            fleet[-1] = slowed(base, self.slow_factor)
        return fleet


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def draw_engines(n: int, seed: int) -> list[DrawnEngine]:
    """``n`` engines from one seeded generator; the same (n, seed) always gives the same fleets, and the
    first k of a larger draw are the k of a smaller one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v = {k: _log_uniform(rng, *RANGES[k]) for k in RANGES}
        slow = rng.random() < SLOW_REPLICA_P
        out.append(DrawnEngine(
            f"u{seed}-{i:02d}", v["request_overhead_s"], v["prefill_per_token_s"], v["decode_step_s"],
            v["decode_per_seq_s"], round(v["max_num_seqs"]), round(v["kv_capacity"], 3),
            round(v["slow_factor"], 2) if slow else None))
    return out


@contextlib.contextmanager
def registered(engine: DrawnEngine) -> Iterator[str]:
    """The drawn fleet visible to `matrix.run_cell` under ``engine.name`` (its engine table, capacity
    table and the timing profiles), removed again afterwards."""
    fleet = engine.profiles()
    names = tuple(f"{engine.name}#{i}" for i in range(len(fleet)))
    for n, p in zip(names, fleet, strict=True):
        timing.PROFILES[n] = p
    matrix.ENGINES[engine.name] = names
    matrix.CAPACITY[engine.name] = engine.kv_capacity
    try:
        yield engine.name
    finally:
        for n in names:
            timing.PROFILES.pop(n, None)
        matrix.ENGINES.pop(engine.name, None)
        matrix.CAPACITY.pop(engine.name, None)


def annotate(cell: dict[str, Any], engine: DrawnEngine) -> dict[str, Any]:
    """Adds the ratio against cache_aware and the engine's parameters to a matrix cell."""
    runs = cell["runs"]
    if "cache_aware" in runs and "cost" in runs:
        cell["ratios"]["ttft_p90_vs_cache_aware"] = round(
            runs["cost"]["ttft_p90_ms"] / runs["cache_aware"]["ttft_p90_ms"], 3)
    cell["engine_params"] = asdict(engine)
    return cell


def run(engines: Sequence[DrawnEngine], workloads: Sequence[str], contenders: Sequence[str], seed: int,
        concurrency: int, poisson: Sequence[float] = (), echo: bool = True, size: int = 1) -> list[dict[str, Any]]:
    cells = []
    for name in workloads:
        workload = matrix.workload_of(name, seed, size)
        for engine in engines:
            with registered(engine) as key:
                loads: list[tuple[float | None, str | None]] = [(None, None)]
                if poisson:
                    sat = matrix.saturation_rate(key, workload, seed)
                    loads += [(f * sat, f"p{round(100 * f)}") for f in poisson]
                for rate, label in loads:
                    cells.append(annotate(matrix.run_cell(key, workload, contenders, seed, concurrency,
                                                          rate=rate, label=label), engine))
                    if echo:
                        print(table(cells[-1:]).splitlines()[-1], flush=True)
    return cells


def _ratio(c: dict[str, Any], key: str) -> float:
    return c.get("ratios", {}).get(key, math.nan)


def table(cells: Sequence[dict[str, Any]]) -> str:
    rows = [[c["engine"], c["workload"], c["load"], c["runs"]["cost"]["ttft_p90_ms"], _ratio(c, "ttft_p90_vs_best"),
             c.get("best_ttft", ""), _ratio(c, "ttft_p90_vs_cache_aware"), _ratio(c, "hit_vs_oracle"),
             _ratio(c, "max_over_mean")] for c in cells]
    return format_table(["engine", "workload", "load", "cost p90 ms", "p90 vs best", "best other",
                         "p90 vs cache_aware", "hit vs oracle", "max/mean"], rows)


def summary(cells: Sequence[dict[str, Any]], worst: int = 5) -> dict[str, Any]:
    """Per load: geo-mean of cost's TTFT p90 over the best other's (and cache_aware's), cells worse than
    1.0x / 1.2x of the best other, and the ``worst`` cells with their engine parameters."""
    by_load: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        by_load.setdefault(c["load"], []).append(c)

    def geo(xs: list[float]) -> float:
        xs = [x for x in xs if x > 0 and math.isfinite(x)]
        return round(math.exp(sum(map(math.log, xs)) / len(xs)), 3) if xs else math.nan

    out: dict[str, Any] = {}
    for load, cs in by_load.items():
        r = [_ratio(c, "ttft_p90_vs_best") for c in cs]
        out[load] = {"cells": len(cs), "geo_mean_vs_best": geo(r),
                     "geo_mean_vs_cache_aware": geo([_ratio(c, "ttft_p90_vs_cache_aware") for c in cs]),
                     "worse_than_1.0": sum(x > 1.0 for x in r), "worse_than_1.2": sum(x > 1.2 for x in r),
                     "geo_mean_hit_vs_oracle": geo([_ratio(c, "hit_vs_oracle") for c in cs])}
    ranked = sorted(cells, key=lambda c: -_ratio(c, "ttft_p90_vs_best"))[:worst]
    out["worst"] = [{"engine": c["engine"], "workload": c["workload"], "load": c["load"],
                     "ttft_p90_vs_best": _ratio(c, "ttft_p90_vs_best"), "best_other": c.get("best_ttft"),
                     "engine_params": c["engine_params"]} for c in ranked]
    return out


def describe(p: dict[str, Any]) -> str:
    slow = f", one replica x{p['slow_factor']}" if p.get("slow_factor") else ""
    return (f"overhead {p['request_overhead_s'] / MS:.1f} ms, prefill {p['prefill_per_token_s'] / US:.0f} us/tok, "
            f"step {p['decode_step_s'] / MS:.1f} ms, per seq {p['decode_per_seq_s'] / MS:.3f} ms, "
            f"{p['max_num_seqs']} seqs, kv {p['kv_capacity']}x{slow}")


@contextlib.contextmanager
def debug_extremes() -> Iterator[dict[str, Any]]:
    """Records the smallest and largest constants the calibration ever priced, its shared decode step
    and any non-finite value, by wrapping `Calibrator.constants` and `Calibrator.shared_step`: the
    symptom of a fit at its bounds or a unit blown up."""
    from router import calibration

    seen: dict[str, Any] = {"min": {}, "max": {}, "nonfinite": 0}
    cls = calibration.Calibrator
    originals = (cls.constants, cls.shared_step)

    def note(values: dict[str, float]) -> None:
        for k, v in values.items():
            if not math.isfinite(v):
                seen["nonfinite"] += 1
                continue
            seen["min"][k] = min(seen["min"].get(k, v), v)
            seen["max"][k] = max(seen["max"].get(k, v), v)

    def wrap(method: Any, values: Any) -> Any:
        def wrapped(self: Any, name: str) -> Any:
            got = method(self, name)
            note(values(got))
            return got
        return wrapped

    cls.constants = wrap(originals[0], lambda c: c.as_dict())  # type: ignore[method-assign]
    cls.shared_step = wrap(originals[1], lambda s: {"shared_step_0": s[0], "shared_step_1": s[1]})  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        cls.constants, cls.shared_step = originals  # type: ignore[method-assign]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.unseen", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines-n", type=int, default=16, help="random engine profiles to draw")
    p.add_argument("--seed", type=int, default=1, help="seeds the draw, the workloads and the simulator")
    p.add_argument("--workloads", type=comma_list(choices=NAMES), default=",".join(matrix.WORKLOADS))
    p.add_argument("--contenders", type=comma_list(choices=matrix.CONTENDERS), default=",".join(CONTENDERS),
                   help="comma list of " + ", ".join(matrix.CONTENDERS))
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--poisson", type=comma_list(float, allow_empty=True), default="",
                   help="also Poisson arrivals at these fractions of saturation")
    p.add_argument("--size", type=int, default=1,
                   help="x this many sessions per workload (gsp groups, multiturn conversations, agentic "
                        "sessions, prefix-sweep requests): steadier p90s, proportionally slower")
    p.add_argument("--debug", action="store_true", help="also record the calibration's extreme constants")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "unseen.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engines = draw_engines(args.engines_n, args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    with debug_extremes() if args.debug else contextlib.nullcontext() as extremes:
        cells = run(engines, args.workloads, args.contenders, args.seed, args.concurrency, args.poisson,
                    size=args.size)
    summ = summary(cells)
    print()
    print(table(cells))
    print()
    for load in (k for k in summ if k != "worst"):
        print(f"{load}: {summ[load]}")
    print("worst cells:")
    for w in summ["worst"]:
        print(f"  {w['ttft_p90_vs_best']:.2f}x {w['engine']} {w['workload']} {w['load']} "
              f"(best {w['best_other']}): {describe(w['engine_params'])}")
    out: dict[str, Any] = {"benchmark": "unseen", "machine": machine_info(), "seed": args.seed,
                           "engines": [asdict(e) for e in engines], "ranges": RANGES,
                           "concurrency": args.concurrency, "size": args.size, "summary": summ, "cells": cells,
                           "real_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    if extremes is not None:
        out["debug_extremes"] = extremes
        print(f"calibration extremes: {extremes}")
    write_json(args.out, out)
    print(f"\nwrote {args.out} ({out['cpu_s']} CPU s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
