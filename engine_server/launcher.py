"""`python -m engine_server launch`: one engine server per GPU group (or N on CPU), supervised.

Each replica is a child process `python -m engine_server ...` with its own port and, on GPUs, its own
`CUDA_VISIBLE_DEVICES` (tensor parallel = GPUs per replica). The launcher waits until every replica
answers /health, prints the URLs (and can write them as a router config file), restarts a replica that
crashes with exponential backoff, and forwards SIGTERM/SIGINT so replicas drain before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from engine_server.cpu_dtype import describe_exit

log = logging.getLogger("engine_server.launcher")

EPILOG = """\
examples:
  # 8 GPUs, tensor parallel 2: four replicas on ports 8001-8004
  python -m engine_server launch --gpus 0-7 --gpus-per-replica 2 --base-port 8001 --model meta-llama/Llama-3.1-8B-Instruct
  # two vLLM-CPU replicas of the project's tiny model, router config written to replicas.yaml
  python -m engine_server launch --cpu-replicas 2 --model ./models/tiny-llama --write-config replicas.yaml
  # two sim replicas publishing KV cache events on ports 5557/5558 and 5559/5560, in the router config
  python -m engine_server launch --cpu-replicas 2 --backend sim --kv-events-base-port 5557 --write-config r.yaml
  # sixteen simulated replicas; flags after `--` go to every replica
  python -m engine_server launch --cpu-replicas 16 --backend sim -- --profile h100-llama3-8b --time-scale 0.5
"""


def parse_gpus(spec: str) -> list[int]:
    """'0-7' -> [0..7]; '0,2,4-5' -> [0, 2, 4, 5]."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    if len(set(out)) != len(out):
        raise ValueError(f"--gpus {spec!r} names a GPU twice")
    return out


@dataclass
class ReplicaSpec:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    kv_events_port: int | None = None  # KV events PUB port; the replay (ROUTER) socket is the next one

    def url(self, host: str) -> str:
        return f"http://{host}:{self.port}"

    def kv_events(self, host: str) -> dict[str, str] | None:
        """Where a router subscribes to this replica's KV events (None when it publishes none)."""
        if self.kv_events_port is None:
            return None
        return {"endpoint": f"tcp://{host}:{self.kv_events_port}",
                "replay_endpoint": f"tcp://{host}:{self.kv_events_port + 1}"}


def kv_events_argv(port: int) -> list[str]:
    """Engine flags publishing on `port` (PUB) and `port + 1` (replay). `*` because vLLM's rule binds only
    wildcard endpoints (a host address would be connected to); the router config names the host."""
    return ["--kv-events-endpoint", f"tcp://*:{port}", "--kv-events-replay-endpoint", f"tcp://*:{port + 1}"]


def plan_replicas(args: argparse.Namespace, extra: Sequence[str]) -> list[ReplicaSpec]:
    base = [sys.executable, "-m", "engine_server", "--backend", args.backend, "--host", args.host]
    if args.model:
        base += ["--model", args.model]
    specs: list[ReplicaSpec] = []
    if args.gpus is not None:
        gpus = parse_gpus(args.gpus)
        per = args.gpus_per_replica
        if per < 1 or len(gpus) % per:
            raise ValueError(f"{len(gpus)} GPUs cannot be split into groups of {per}")
        for i in range(len(gpus) // per):
            group = gpus[i * per:(i + 1) * per]
            port = args.base_port + i
            argv = base + ["--port", str(port), "--tensor-parallel-size", str(per)]
            specs.append(ReplicaSpec(f"replica-{i}", port, argv,
                                     {"CUDA_VISIBLE_DEVICES": ",".join(map(str, group))}))
    else:
        cores = sorted(os.sched_getaffinity(0))
        for i in range(args.cpu_replicas):
            port = args.base_port + i
            env: dict[str, str] = {}
            if args.backend == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                # Split the cores between replicas so their OpenMP pools do not fight over the same CPUs.
                share = cores[i::args.cpu_replicas] or cores
                env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, share))
            specs.append(ReplicaSpec(f"replica-{i}", port, base + ["--port", str(port)], env))
    kv_base = getattr(args, "kv_events_base_port", None)
    if kv_base is not None and any(a.startswith("--kv-events-") and "endpoint" in a for a in extra):
        raise ValueError("--kv-events-base-port assigns each replica its endpoints: do not also pass "
                         "--kv-events-*endpoint after `--`")
    for i, spec in enumerate(specs):
        if kv_base is not None:
            spec.kv_events_port = kv_base + 2 * i
            spec.argv += kv_events_argv(spec.kv_events_port)
        spec.argv += list(extra)
    return specs


def router_config(specs: Sequence[ReplicaSpec], host: str, model: str | None,
                  kv_events: dict[str, object] | None = None) -> dict[str, object]:
    """The router config for these replicas; with KV events, the `kv_events` section naming each
    replica's endpoints (block size and model still come from its /load) plus ``kv_events`` (the
    tokenizer settings, see `kv_events_tokenizer`)."""
    replicas: list[dict[str, object]] = []
    for s in specs:
        entry: dict[str, object] = {"name": s.name, "url": s.url(host)}
        if model:
            entry["models"] = [model]
        replicas.append(entry)
    out: dict[str, object] = {"replicas": replicas}
    sources = {s.name: ev for s in specs if (ev := s.kv_events(host)) is not None}
    if sources:
        out["kv_events"] = {"enabled": True, **(kv_events or {}), "replicas": sources}
    return out


def kv_events_tokenizer(backend: str, model: str | None, extra: Sequence[str]) -> dict[str, object]:
    """How the router tokenizes for these replicas: the sim's rule (and its --chars-per-token), or the
    model's own tokenizer from the path or hub id the replicas load."""
    if backend == "sim":
        out: dict[str, object] = {"tokenizer": "sim"}
        for i, a in enumerate(extra):
            if a == "--chars-per-token" and i + 1 < len(extra):
                out["sim_chars_per_token"] = int(extra[i + 1])
            elif a.startswith("--chars-per-token="):
                out["sim_chars_per_token"] = int(a.split("=", 1)[1])
        return out
    return {"tokenizer": model} if model else {}


LOG_TAIL_LINES = 15
PROGRESS_EVERY_S = 15.0


class Supervisor:
    """Keeps each replica process alive; restarts crashes with backoff (1 s doubling to 30 s).

    Replica output goes through the launcher (each line prefixed with the replica's name), which keeps the
    last lines of each: when a replica exits, or is slow to become healthy, the launcher says why with
    them. A replica that exits before it was ever healthy is a start-up failure (a model that cannot load,
    an engine that dies on its warm-up request): after `max_start_failures` of those it is given up on,
    so a launch that cannot succeed fails fast instead of restarting for minutes.
    """

    def __init__(self, specs: list[ReplicaSpec], host: str, max_restarts: int,
                 max_start_failures: int = 2) -> None:
        self.specs = specs
        self.host = host
        self.max_restarts = max_restarts
        self.max_start_failures = max_start_failures
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {s.name: 0 for s in specs}
        self.tails: dict[str, collections.deque[str]] = {s.name: collections.deque(maxlen=LOG_TAIL_LINES)
                                                          for s in specs}
        self.healthy_once: set[str] = set()
        self.gave_up: dict[str, str] = {}  # name -> why
        self.stopping = False
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self, spec: ReplicaSpec) -> None:
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        log.info("starting %s on port %d: %s", spec.name, spec.port, " ".join(spec.argv[1:]))
        proc = await asyncio.create_subprocess_exec(
            *spec.argv, env=env, start_new_session=True, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, limit=1 << 20)
        self.procs[spec.name] = proc
        assert proc.stdout is not None
        pump = asyncio.create_task(self._pump(spec.name, proc.stdout))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        """Forward a replica's output line by line, prefixed with its name, and keep its last lines."""
        tail = self.tails[name]
        prefix = f"[{name}] ".encode()
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the 1 MiB limit: take what is buffered
                line = await stream.read(1 << 20)
            if not line:
                return
            tail.append(line.decode(errors="replace").rstrip())
            sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            sys.stdout.flush()

    def last_lines(self, name: str) -> str:
        lines = list(self.tails[name]) or ["(no output)"]
        return "\n".join(f"    {ln}" for ln in lines)

    async def wait_healthy(self, timeout_s: float) -> list[str]:
        """Names of replicas that did not answer /health 200 within the timeout (or were given up on),
        printing progress with each waiting replica's last log line every PROGRESS_EVERY_S."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        next_progress = t0 + PROGRESS_EVERY_S
        pending = {s.name: s for s in self.specs}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while pending and time.monotonic() < deadline and not self.stopping:
                if any(name in self.gave_up for name in pending):
                    break  # it cannot succeed: fail now, not at the timeout
                for name, spec in list(pending.items()):
                    proc = self.procs.get(name)
                    if proc is not None and proc.returncode is not None:
                        continue  # exited: the watch loop restarts it
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with http.get(spec.url(self.host) + "/health") as r:
                            if r.status == 200:
                                log.info("%s healthy at %s", name, spec.url(self.host))
                                self.healthy_once.add(name)
                                del pending[name]
                if pending and time.monotonic() >= next_progress:
                    next_progress += PROGRESS_EVERY_S
                    for name in sorted(pending):
                        last = self.tails[name][-1] if self.tails[name] else "(no output yet)"
                        log.info("waiting for %s (%.0fs of %.0fs); last line: %s", name,
                                 time.monotonic() - t0, timeout_s, last[:300])
                await asyncio.sleep(0.5)
        return sorted(pending)

    async def watch(self, spec: ReplicaSpec) -> None:
        backoff = 1.0
        start_failures = 0
        while not self.stopping:
            proc = self.procs[spec.name]
            started = time.monotonic()
            code = await proc.wait()
            if self.stopping:
                return
            await asyncio.sleep(0.1)  # let the pump take the last lines
            how = describe_exit(code)
            if spec.name not in self.healthy_once:
                start_failures += 1
                if start_failures >= self.max_start_failures:
                    self.gave_up[spec.name] = f"{how} before it became healthy, {start_failures} time(s)"
                    log.error("%s %s; gave up. Its last lines:\n%s", spec.name, self.gave_up[spec.name],
                              self.last_lines(spec.name))
                    return
            if self.restarts[spec.name] >= self.max_restarts:
                self.gave_up[spec.name] = f"{how}; gave up after {self.max_restarts} restarts"
                log.error("%s %s. Its last lines:\n%s", spec.name, self.gave_up[spec.name],
                          self.last_lines(spec.name))
                return
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran fine for a while: this is a fresh crash, not a crash loop
            self.restarts[spec.name] += 1
            log.warning("%s %s; restart %d in %.0fs. Its last lines:\n%s", spec.name, how,
                        self.restarts[spec.name], backoff, self.last_lines(spec.name))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            if not self.stopping:
                await self.start(spec)

    async def stop(self, grace_s: float) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("%s did not stop in %.0fs: killing its process group", name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def run(args: argparse.Namespace, specs: list[ReplicaSpec], extra: Sequence[str] = ()) -> int:
    sup = Supervisor(specs, args.host, args.max_restarts, args.max_start_failures)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for spec in specs:
        await sup.start(spec)
    watchers = [asyncio.create_task(sup.watch(s)) for s in specs]
    health = asyncio.create_task(sup.wait_healthy(args.health_timeout_s))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({health, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if health.done():
        missing = health.result()
        if missing:
            for name in missing:
                if name in sup.gave_up:  # its last lines were printed when it was given up on
                    log.error("%s failed: %s", name, sup.gave_up[name])
                else:
                    log.error("%s not healthy after %.0fs. Its last lines:\n%s", name, args.health_timeout_s,
                              sup.last_lines(name))
            code = 1
        else:
            urls = [s.url(args.host) for s in specs]
            print("replicas ready:", flush=True)
            for s in specs:
                print(f"  {s.name}  {s.url(args.host)}", flush=True)
            if args.write_config:
                Path(args.write_config).write_text(
                    yaml.safe_dump(router_config(specs, args.host, args.served_name or args.model,
                                                 kv_events_tokenizer(args.backend, args.model, extra)),
                                   sort_keys=False))
                print(f"router config written to {args.write_config}", flush=True)
            print("router: python -m router --port 8000 " + " ".join(f"--replica {u}" for u in urls), flush=True)
            if not args.exit_when_ready:
                await stopper
    health.cancel()
    stopper.cancel()
    await sup.stop(args.shutdown_grace_s)
    for w in watchers:
        w.cancel()
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine_server launch",
        description="Start one engine server per GPU group (--gpus) or N on CPU (--cpu-replicas), wait for "
                    "health, restart crashed replicas with backoff, forward SIGTERM/SIGINT. Arguments after "
                    "`--` are passed to every replica (see python -m engine_server --help).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", help="GPU ids to use, e.g. 0-7 or 0,1,2,3")
    where.add_argument("--cpu-replicas", type=int, help="run N replicas on the CPU (vllm-cpu or --backend sim)")
    p.add_argument("--gpus-per-replica", type=int, default=2, help="tensor-parallel group size (default 2)")
    p.add_argument("--backend", choices=["vllm", "sim"], default="vllm", help="engine backend (default vllm)")
    p.add_argument("--model", help="model path or name (sim: served name)")
    p.add_argument("--served-name", help="model name written into the router config (default --model)")
    p.add_argument("--host", default="127.0.0.1", help="address replicas listen on (default 127.0.0.1)")
    p.add_argument("--base-port", type=int, default=8001, help="first replica's port; then +1 each (default 8001)")
    p.add_argument("--write-config", metavar="FILE", help="write the replicas as a router config (YAML)")
    p.add_argument("--kv-events-base-port", type=int, default=None, metavar="PORT",
                   help="replicas publish KV cache events (vLLM's ZMQ format): replica i on PORT+2i (PUB) and "
                        "PORT+2i+1 (replay); written into --write-config (default: off)")
    p.add_argument("--health-timeout-s", type=float, default=900.0, help="wait this long for health (default 900)")
    p.add_argument("--max-restarts", type=int, default=5, help="restarts per replica before giving up (default 5)")
    p.add_argument("--max-start-failures", type=int, default=2,
                   help="exits before first becoming healthy after which a replica is given up on and the "
                        "launch fails (default 2)")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0, help="drain time on SIGTERM (default 30)")
    p.add_argument("--exit-when-ready", action="store_true", help="stop everything once healthy (smoke test)")
    return p


def launch_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launcher: %(message)s")
    if args.cpu_replicas is not None and args.cpu_replicas < 1:
        raise SystemExit("error: --cpu-replicas must be at least 1")
    try:
        specs = plan_replicas(args, extra)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.backend == "vllm" and not args.model:
        raise SystemExit("error: --model is required with --backend vllm")
    from engine_server.serving import install_uvloop

    install_uvloop()
    return asyncio.run(run(args, specs, extra))
