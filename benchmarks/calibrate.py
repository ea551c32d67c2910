"""Calibrate the sim's `tiny-cpu` step-time profile against the real engine (vLLM CPU + the tiny model).

Drives `VllmBackend` directly (no HTTP) and records every engine step from vLLM's scheduler stats:
tokens prefilled (after cache hits), sequences decoded, and the wall time between consecutive steps
while the engine is continuously busy (so scheduling, IPC and sampling are in it, as the sim needs).
Steps are made by keeping D background sequences decoding (D = 1, 4, 16) and injecting prompts of
64..1024 tokens, uncached and then cached (only the tail is recomputed). Least squares then gives

    step_time = a + b * prefill_tokens + c * decode_seqs     (sim: step_overhead, prefill_per_token,
                                                               decode_per_seq)

Decode-only steps fix a and c, prefill steps then b (`fit_staged`). A second check times isolated
requests (engine idle before): TTFT vs. the fitted a + b * P.

    python -m benchmarks.calibrate                   # generates the tiny model in a temp dir
    python -m benchmarks.calibrate --model ./models/tiny-llama --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.lib.comma import comma_list
from engine_server.backend import GenerationRequest, SamplingOptions
from engine_server.vllm_backend import VllmBackend, VllmConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "calibration-tiny-cpu.json"
WORDS = ("the", "cache", "router", "engine", "token", "prompt", "block", "replica", "request", "decode",
         "prefill", "batch", "model", "river", "garden", "morning", "window", "number", "system", "answer",
         "question", "simple", "yellow", "seven", "network", "memory")


@dataclass(frozen=True, slots=True)
class Step:
    prefill_tokens: int
    decode_seqs: int
    seconds: float  # wall time since the previous step's report (engine busy in between)
    forward_s: float  # vLLM's own timing of the model execution inside the step
    phase: str


class StepRecorder:
    """Step observer: turns consecutive scheduler reports into `Step` rows."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.count = 0
        self.phase = "warmup"
        self._last_t: float | None = None
        self._busy_after_last = False

    def __call__(self, stats: Any) -> None:
        now = time.perf_counter()
        details = getattr(stats, "iteration_details", None)
        if details is None or details.is_dummy:
            self._last_t = None
            return
        self.count += 1
        if self._last_t is not None and self._busy_after_last:
            self.steps.append(Step(details.num_ctx_tokens, details.num_generation_requests, now - self._last_t,
                                   details.elapsed_ms / 1000.0, self.phase))
        self._last_t = now
        self._busy_after_last = stats.num_running_reqs + stats.num_waiting_reqs > 0

    async def wait_steps(self, n: int, timeout: float = 60.0) -> None:
        target, deadline = self.count + n, time.monotonic() + timeout
        while self.count < target and time.monotonic() < deadline:
            await asyncio.sleep(0.002)


class CpuShare:
    """How many cores processes outside this one's tree kept busy (other jobs skew the timings)."""

    def __init__(self) -> None:
        self.t0, self.sys0, self.own0 = time.monotonic(), self._system(), self._own()

    @staticmethod
    def _system() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def _own() -> float:
        total = 0.0
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def other_cores(self) -> float:
        wall = time.monotonic() - self.t0
        return max(0.0, (self._system() - self.sys0) - (self._own() - self.own0)) / wall if wall else 0.0


def make_prompt(backend: VllmBackend, n_tokens: int, rng: random.Random) -> str:
    """A prompt of about `n_tokens` tokens that starts with a unique nonce (so it is never cached)."""
    tok = backend.engine.get_tokenizer()
    text = f"{rng.getrandbits(64):x} " + " ".join(rng.choice(WORDS) for _ in range(n_tokens * 2))
    ids = tok.encode(text, add_special_tokens=False)[: max(1, n_tokens - 1)]
    return tok.decode(ids)


async def run(backend: VllmBackend, prompt: str, max_tokens: int, ignore_eos: bool = True) -> float:
    """Run one request to the end; returns its time to first token."""
    t0 = time.perf_counter()
    ttft = None
    request = GenerationRequest(f"cal-{t0}", prompt, SamplingOptions(max_tokens=max_tokens, ignore_eos=ignore_eos))
    async with contextlib.aclosing(backend.generate(request)) as stream:
        async for _ in stream:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
    return ttft or 0.0


async def collect(backend: VllmBackend, rec: StepRecorder, lengths: list[int], decode_levels: list[int],
                  reps: int, rng: random.Random) -> None:
    for d in decode_levels:
        rec.phase = f"decode={d}"
        budget = backend.max_model_len - 64
        background = [asyncio.create_task(run(backend, make_prompt(backend, 32, rng), budget)) for _ in range(d)]
        while backend.engine_load.running < d:
            await rec.wait_steps(1)
        await rec.wait_steps(3)
        for _ in range(reps):
            for p in lengths:
                prompt = make_prompt(backend, p, rng)
                rec.phase = f"decode={d} prefill={p} uncached"
                await run(backend, prompt, 1)
                rec.phase = f"decode={d}"
                await rec.wait_steps(2)
                rec.phase = f"decode={d} prefill={p} cached"
                await run(backend, prompt, 1)
                rec.phase = f"decode={d}"
                await rec.wait_steps(2)
        await rec.wait_steps(30)
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.sleep(0.2)


def fit(rows: list[Step], columns: list[str], target: str = "seconds") -> dict[str, Any]:
    """Ordinary least squares of step time on the named columns (1, prefill_tokens, decode_seqs)."""
    feats = {
        "step_overhead_s": lambda s: 1.0,
        "prefill_per_token_s": lambda s: float(s.prefill_tokens),
        "decode_per_seq_s": lambda s: float(s.decode_seqs),
    }
    x = np.array([[feats[c](s) for c in columns] for s in rows])
    y = np.array([getattr(s, target) for s in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return _scored({c: float(v) for c, v in zip(columns, coef, strict=True)}, rows, target)


def fit_staged(steps: list[Step], target: str = "seconds") -> dict[str, Any]:
    """Two least-squares stages: decode-only steps (hundreds, low noise) give the overhead `a` and the
    per-sequence cost `c`; prefill steps then give `b` from what is left of their time.

    A single fit over all steps lets the noisy, slightly superlinear prefill steps (±20 ms at 1024
    tokens) swamp the ~0.2 ms/sequence decode slope, which can then come out negative.
    """
    dec = [s for s in steps if not s.prefill_tokens]
    pre = [s for s in steps if s.prefill_tokens]
    x = np.array([[1.0, s.decode_seqs] for s in dec])
    (a, c), *_ = np.linalg.lstsq(x, np.array([getattr(s, target) for s in dec]), rcond=None)
    rest = np.array([getattr(s, target) - a - c * s.decode_seqs for s in pre])
    (b,), *_ = np.linalg.lstsq(np.array([[float(s.prefill_tokens)] for s in pre]), rest, rcond=None)
    coef = {"step_overhead_s": float(a), "prefill_per_token_s": float(b), "decode_per_seq_s": float(c)}
    return _scored(coef, steps, target)


def _scored(coef: dict[str, Any], rows: list[Step], target: str) -> dict[str, Any]:
    y = np.array([getattr(s, target) for s in rows])
    pred = np.array([predict(coef, s.prefill_tokens, s.decode_seqs) for s in rows])
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {**coef, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0, "rmse_s": (ss_res / len(y)) ** 0.5,
            "n_steps": len(y)}


def predict(coef: dict[str, Any], prefill: int, decode: int) -> float:
    return coef["step_overhead_s"] + coef["prefill_per_token_s"] * prefill + coef["decode_per_seq_s"] * decode


def group_medians(steps: list[Step]) -> list[Step]:
    """One row per kind of step: each injected prompt per phase, decode-only steps per batch size."""
    keyed: dict[str, list[Step]] = {}
    for s in steps:
        key = s.phase if s.prefill_tokens else f"decode-only seqs={s.decode_seqs}"
        keyed.setdefault(key, []).append(s)
    return [Step(int(statistics.median(s.prefill_tokens for s in ss)), int(statistics.median(s.decode_seqs for s in ss)),
                 statistics.median(s.seconds for s in ss), statistics.median(s.forward_s for s in ss), key)
            for key, ss in sorted(keyed.items())]


def group_table(steps: list[Step], coef: dict[str, Any]) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    for s in steps:
        key = s.phase if s.prefill_tokens else f"decode-only seqs={s.decode_seqs}"
        counts[key] = counts.get(key, 0) + 1
    rows = []
    for g in group_medians(steps):
        fitted = predict(coef, g.prefill_tokens, g.decode_seqs)
        row = {"group": g.phase, "n": counts[g.phase], "prefill_tokens": g.prefill_tokens,
               "decode_seqs": g.decode_seqs, "measured_ms": round(g.seconds * 1e3, 3),
               "fitted_ms": round(fitted * 1e3, 3), "forward_ms": round(g.forward_s * 1e3, 3)}
        if g.prefill_tokens:  # what one prompt token really cost in this step (shows the superlinearity)
            rest = g.seconds - coef["step_overhead_s"] - coef["decode_per_seq_s"] * g.decode_seqs
            row["us_per_prefill_token"] = round(rest / g.prefill_tokens * 1e6, 1)
        rows.append(row)
    return rows


async def calibrate(args: argparse.Namespace, model: str, label: str) -> dict[str, Any]:
    backend = VllmBackend(VllmConfig(
        model=model, max_model_len=args.max_model_len, block_size=args.block_size, dtype=args.dtype,
        enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs, seed=0,
        extra_engine_args={"enable_logging_iteration_details": True},
    ))
    rec = StepRecorder()
    backend.add_step_observer(rec)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    await backend.start()
    startup_s = time.monotonic() - t0
    try:
        # Warm up kernels at every size, then measure.
        for p in args.prompt_lengths:
            await run(backend, make_prompt(backend, p, rng), 4)
        rec.steps.clear()
        busy = CpuShare()
        await collect(backend, rec, args.prompt_lengths, args.decode_seqs, args.reps, rng)
        steps = [s for s in rec.steps if s.seconds >= s.forward_s]  # drop reports that arrived in a burst
        other_cpu = busy.other_cores()
        ttft = []
        for p in args.prompt_lengths:
            samples = [await run(backend, make_prompt(backend, p, rng), 1) for _ in range(args.reps)]
            ttft.append((p, statistics.median(samples)))
        vcfg = backend.engine.vllm_config
        engine = {
            "vllm_version": _version("vllm"), "torch_version": _version("torch"), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpus": psutil.cpu_count(),
            "startup_s": round(startup_s, 1),
            "other_processes_cores": round(other_cpu, 2),  # CPU others used while measuring: > ~0.1 is noisy
            "dtype": str(vcfg.model_config.dtype).removeprefix("torch."),
            "enforce_eager": vcfg.model_config.enforce_eager, "block_size": backend.block_size,
            "num_blocks": backend.num_blocks, "max_num_seqs": vcfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": vcfg.scheduler_config.max_num_batched_tokens,
            "max_model_len": backend.max_model_len,
        }
    finally:
        await backend.stop()
    cols = ["step_overhead_s", "prefill_per_token_s", "decode_per_seq_s"]
    main_fit = fit_staged(steps)
    return {
        "profile": "tiny-cpu",
        "model": label,
        "model_form": "step_s = step_overhead_s + prefill_per_token_s * prefill_tokens + decode_per_seq_s * decode_seqs",
        "fit": main_fit,  # staged least squares (see fit_staged)
        "fit_single_ols": fit(steps, cols),  # one least-squares fit over every step, for comparison
        "fit_forward_only": fit_staged(steps, "forward_s"),  # model execution only, no scheduling/IPC
        "groups": group_table(steps, main_fit),
        "ttft_isolated": [{"prompt_tokens": p, "measured_ms": round(t * 1e3, 2),
                           "fitted_step_ms": round(predict(main_fit, p, 0) * 1e3, 2)} for p, t in ttft],
        "engine": engine,
        "timing_profile": {  # ready to paste into engine_server/sim/timing.py
            "step_overhead_s": round(main_fit["step_overhead_s"], 6),
            "prefill_per_token_s": round(main_fit["prefill_per_token_s"], 9),
            "decode_per_seq_s": round(main_fit["decode_per_seq_s"], 9),
            "max_num_seqs": engine["max_num_seqs"], "max_num_batched_tokens": engine["max_num_batched_tokens"],
            "max_model_len": engine["max_model_len"], "num_blocks": engine["num_blocks"],
        },
        "grid": {"prompt_lengths": args.prompt_lengths, "decode_seqs": args.decode_seqs, "reps": args.reps},
        "steps": [asdict(s) for s in steps],
    }


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (pkg, f"{pkg}-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model dir (default: generate the tiny model into a temp dir)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--prompt-lengths", type=comma_list(int), default=[64, 128, 256, 512, 1024])
    p.add_argument("--decode-seqs", type=comma_list(int), default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=3, help="repetitions of each prompt length")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the backend's (eager on CPU)")
    p.add_argument("--seed", type=int, default=0, help="prompt RNG seed")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from engine_server.tiny_model import generate

            model = str(generate(Path(tmp) / "tiny-llama", seed=0))
        result = asyncio.run(calibrate(args, model, args.model or "engine_server.tiny_model --seed 0"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    f = result["fit"]
    print(f"\nstep_time = {f['step_overhead_s'] * 1e3:.3f} ms + {f['prefill_per_token_s'] * 1e6:.2f} us * prefill_tokens"
          f" + {f['decode_per_seq_s'] * 1e3:.3f} ms * decode_seqs   (R^2 {f['r2']:.3f}, RMSE {f['rmse_s'] * 1e3:.2f} ms"
          f" over {f['n_steps']} steps)")
    print(f"{'median step of kind':38} {'n':>4} {'prefill':>7} {'decode':>6} {'measured':>9} {'fitted':>8} "
          f"{'forward':>8} {'us/prefill tok':>14}")
    for g in result["groups"]:
        print(f"{g['group']:38} {g['n']:4} {g['prefill_tokens']:7} {g['decode_seqs']:6} {g['measured_ms']:8.2f}ms"
              f" {g['fitted_ms']:7.2f}ms {g['forward_ms']:7.2f}ms {g.get('us_per_prefill_token', ''):>14}")
    if result["engine"]["other_processes_cores"] > 0.1:
        print(f"warning: other processes kept {result['engine']['other_processes_cores']:.2f} cores busy while "
              "measuring; rerun on a quiet machine", file=sys.stderr)
    for t in result["ttft_isolated"]:
        print(f"isolated prompt {t['prompt_tokens']:5} tokens: TTFT {t['measured_ms']:.1f} ms, fitted step "
              f"{t['fitted_step_ms']:.1f} ms")
    summary = {k: v for k, v in result.items() if k not in ("steps", "groups")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps children from re-running this
    raise SystemExit(main())
