"""How far the sim is from the real engine: tolerances, per-metric errors, the rows of the fidelity table,
and the tokenizer ratio (pure functions, so they are tested without an engine)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.lib.loadgen import RequestRecord
from benchmarks.lib.stats import percentile


@dataclass(frozen=True)
class Tolerance:
    """How far the sim may be from vLLM and still count as faithful.

    ``kind`` "rel": |sim - vllm| / vllm <= bound (latencies, throughput, token counts);
    ``kind`` "abs": |sim - vllm| <= bound (dimensionless rates such as the hit rate, where a relative
    error of a small number would mislead).
    """

    kind: str
    bound: float

    def __post_init__(self) -> None:
        if self.kind not in ("rel", "abs"):
            raise ValueError(f"tolerance kind must be 'rel' or 'abs', not {self.kind!r}")
        if self.bound < 0:
            raise ValueError("tolerance bound must be >= 0")

    def describe(self) -> str:
        return f"±{self.bound * 100:g}%" if self.kind == "rel" else f"±{self.bound:g}"


def error_of(vllm: float, sim: float, tol: Tolerance) -> float:
    """Signed error of the sim against vLLM: relative ((sim - vllm) / vllm) or absolute (sim - vllm).

    NaN when a value is missing or a relative error has a zero reference (both zero counts as 0).
    """
    if math.isnan(vllm) or math.isnan(sim):
        return math.nan
    if tol.kind == "abs":
        return sim - vllm
    if vllm == 0:
        return 0.0 if sim == 0 else math.nan
    return (sim - vllm) / vllm


def within(error: float, tol: Tolerance) -> bool:
    """True when the error is known and inside the bound (a small epsilon absorbs float rounding)."""
    return not math.isnan(error) and abs(error) <= tol.bound + 1e-9


def format_error(error: float, tol: Tolerance) -> str:
    """'+12.3%' for a relative error, '+0.012' for an absolute one, 'nan' when unknown."""
    if math.isnan(error):
        return "nan"
    return f"{error * 100:+.1f}%" if tol.kind == "rel" else f"{error:+.3f}"


@dataclass(frozen=True)
class Metric:
    """One compared quantity: its key in `run_metrics` output, a label and its tolerance."""

    key: str
    label: str
    tol: Tolerance


def default_metrics(hit_tol: float = 0.05, latency_tol: float = 0.30, tokens_tol: float = 0.10) -> list[Metric]:
    """What is comparable across the two tokenizers: rates, latencies, throughput, per-request counts."""
    lat = Tolerance("rel", latency_tol)
    return [
        Metric("prompt_tokens_per_req", "prompt tok/req", Tolerance("rel", tokens_tol)),
        Metric("output_tokens_per_req", "output tok/req", Tolerance("rel", 0.0)),
        Metric("hit_rate", "hit rate", Tolerance("abs", hit_tol)),
        Metric("ttft_p50_ms", "TTFT p50 ms", lat),
        Metric("ttft_p90_ms", "TTFT p90 ms", lat),
        Metric("tpot_p50_ms", "TPOT p50 ms", lat),
        Metric("e2e_p50_ms", "E2E p50 ms", lat),
        Metric("output_tok_per_s", "output tok/s", lat),
    ]


def run_metrics(summary: Mapping[str, Any], records: Sequence[RequestRecord]) -> dict[str, float]:
    """The flat numbers compared, from `summarize_run`'s summary and the run's records (successes only)."""
    ok = [r for r in records if r.ok]
    n = len(ok)
    return {
        "requests_ok": float(n),
        "prompt_tokens_per_req": sum(r.prompt_tokens for r in ok) / n if n else math.nan,
        "output_tokens_per_req": sum(r.output_tokens for r in ok) / n if n else math.nan,
        "hit_rate": float(summary.get("hit_rate", math.nan)),
        "ttft_p50_ms": float(summary["ttft_ms"]["p50"]),
        "ttft_p90_ms": float(summary["ttft_ms"]["p90"]),
        "tpot_p50_ms": float(summary["tpot_ms"]["p50"]),
        "e2e_p50_ms": float(summary["e2e_ms"]["p50"]),
        "output_tok_per_s": float(summary.get("output_tok_per_s", math.nan)),
    }


@dataclass(frozen=True)
class Row:
    """One line of the fidelity table."""

    workload: str
    concurrency: int
    metric: str
    vllm: float
    sim: float
    error: float
    tolerance: str
    within: bool
    error_text: str


def fidelity_rows(workload: str, concurrency: int, vllm: Mapping[str, float], sim: Mapping[str, float],
                  metrics: Sequence[Metric]) -> list[Row]:
    """Compare one run's numbers, metric by metric."""
    rows = []
    for m in metrics:
        v, s = float(vllm.get(m.key, math.nan)), float(sim.get(m.key, math.nan))
        err = error_of(v, s, m.tol)
        rows.append(Row(workload, concurrency, m.label, v, s, err, m.tol.describe(), within(err, m.tol),
                        format_error(err, m.tol)))
    return rows


TABLE_HEADERS = ("workload", "c", "metric", "vllm", "sim", "error", "tolerance", "verdict")


def table_cells(row: Row) -> list[Any]:
    """A row as the printed table shows it (numbers rounded to what the measurement supports)."""
    def num(x: float) -> Any:
        if math.isnan(x):
            return x
        return round(x, 3) if abs(x) < 10 else round(x, 1)

    return [row.workload, row.concurrency, row.metric, num(row.vllm), num(row.sim), row.error_text,
            row.tolerance, "within" if row.within else "OUTSIDE"]


def ttft_by_kind(records: Sequence[RequestRecord]) -> dict[str, dict[str, float]]:
    """TTFT p50 (ms) and count of prefix hits (some cached tokens) and misses: separates the per-request
    overhead (visible on hits, little prefill) from the prefill slope (visible on misses)."""
    out = {}
    for kind, pick in (("hit", lambda r: r.cached_tokens > 0), ("miss", lambda r: r.cached_tokens == 0)):
        v = [r.ttft_s * 1e3 for r in records if r.ok and r.ttft_s is not None and pick(r)]
        out[kind] = {"n": float(len(v)), "ttft_p50_ms": round(percentile(v, 0.5), 1)}
    return out


def paired_ttft(vllm: Sequence[RequestRecord], sim: Sequence[RequestRecord]) -> dict[str, float]:
    """Per request (same session and turn on both engines): median TTFT difference sim - vllm in ms and
    median ratio sim / vllm. A constant difference points at a fixed per-request cost the sim lacks."""
    sim_by_key = {(r.session, r.turn): r for r in sim if r.ok and r.ttft_s is not None}
    pairs = [(r.ttft_s, sim_by_key[(r.session, r.turn)].ttft_s) for r in vllm
             if r.ok and r.ttft_s and (r.session, r.turn) in sim_by_key]
    diffs = [(s - v) * 1e3 for v, s in pairs if s is not None]
    ratios = [s / v for v, s in pairs if s is not None and v > 0]
    return {"n": float(len(diffs)), "median_diff_ms": round(percentile(diffs, 0.5), 1),
            "median_ratio": round(percentile(ratios, 0.5), 3)}


def chars_per_token(chars: int, tokens: int) -> float:
    """Average characters per real-tokenizer token on the same text."""
    if tokens <= 0:
        raise ValueError("no tokens measured")
    return chars / tokens


def sim_chars_per_token(ratio: float) -> int:
    """The sim flag is an integer: the nearest one, at least 1."""
    return max(1, round(ratio))
