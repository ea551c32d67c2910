"""Start any contender router (ours or a peer) as a subprocess in front of given engines, one interface.

A `Contender` names a router and policy and builds its exact command line; `run_router` starts it on a free
loopback port, waits until it really routes (health answers *and* a streamed chat completion goes through;
peers answer /health before their workers are registered), and always stops it again (SIGTERM, 5 s, SIGKILL,
also on errors and cancellation). A router that dies or never routes raises `RouterStartError` with its argv
and the tail of its log, so a benchmark can report it as a failed contender instead of dropping it.

Peers are the PyPI routers pinned in the `bench` extra (`pip install -e .[bench]`), run only via their CLIs.
What they need from our engines (checked against `python -m engine_server --backend sim`, 4 replicas):

- both: streamed chat and completions pass through unchanged, `usage` with
  `prompt_tokens_details.cached_tokens` included; neither sets a replica header (ours: `x-router-replica`),
  so per-replica shares must come from the engines' /metrics.
- sglang-router: at start-up each worker gets an HTTP/2 (gRPC) probe (the engine logs a 400 "PRI/Upgrade"
  traceback, harmless) and GET /server_info, /get_server_info, /model_info, /get_model_info (404: sglang-only),
  so it serves the model as "unknown" and has no tokenizer; routing works. On a reused (keep-alive) client
  connection every streamed answer's first chunk arrives ~40 ms late (fresh connections: no stall), the
  pattern of Nagle + delayed ACK; SDK clients pool connections, so benchmarks keep them alive.
- vllm-router `cache_aware`: for every request, on every replica, POST /v1/chat/completions/render (or
  /v1/completions/render; 404 here, 403 on stock vLLM without --enable-scale-out), then POST /tokenize (vLLM's
  endpoint, served by engine_server): 2 x replicas extra calls per request, as in front of stock vLLM.
- `power_of_two` of both polls GET /get_load (sglang-only, 404 on vLLM and here), so it never sees engine load.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.lib.client import stream_chat
from benchmarks.lib.defaults import HOST, MODEL, ROOT
from benchmarks.lib.fleet import RouterSpec, free_port, kv_event_endpoints

KINDS = ("ours", "sglang-router", "vllm-router", "aiohttp-floor")
FLOOR_MODULE = "benchmarks.lib.floor_relay"  # the "aiohttp-floor" kind: our stack with no router in it
_PEER_IMPORT = {"sglang-router": "sglang_router", "vllm-router": "vllm_router"}
_PEER_MODULE = {"sglang-router": "sglang_router.launch_router", "vllm-router": "vllm_router.launch_router"}
_PEER_LOG_LEVEL = {"sglang-router": "warn", "vllm-router": "warning"}
_PEER_PREFIX = {"sglang-router": "sglang", "vllm-router": "vllm-router"}

# The peers' prefix-policy defaults (from their --help; we keep them, these record what was compared).
PEER_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "sglang-router": {
        "cache_aware": {"cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5,
                        "eviction_interval_secs": 60, "max_tree_size": 67108864},
        "power_of_two": {"load_monitor_interval_s": 30},
    },
    "vllm-router": {
        "cache_aware": {"cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5,
                        "eviction_interval_secs": 120, "max_tree_size": 33554432},
        "consistent_hash": {"virtual_nodes": 160},
        "power_of_two": {"load_check_interval_secs": 5},
    },
}

_COMMON_NOTES = {
    "sglang-router": "start-up probes gRPC and sglang-only /server_info, /model_info (404): model shown as "
                     "'unknown', no tokenizer; ~40 ms first-chunk stall on keep-alive client connections; "
                     "usage incl. cached_tokens passed through; no replica header",
    "vllm-router": "usage incl. cached_tokens passed through; no replica header",
}
_POLICY_NOTES = {
    ("sglang-router", "cache_aware"): "char radix tree over the request text",
    ("sglang-router", "power_of_two"): "polls sglang-only GET /get_load every 30 s (404 on vLLM): no engine "
                                       "load, only its own view of the workers (or random)",
    ("vllm-router", "cache_aware"): "per request and replica: POST .../render (404; 403 on stock vLLM) then "
                                    "POST /tokenize: 2 x replicas extra calls per request",
    ("vllm-router", "kv_aware"): "follows the sim engines' KV events (same wire format as vLLM's ZMQ publisher): "
                                 "--kv-event-source URL=PUB and --kv-event-replay-source URL=REPLAY per worker, "
                                 "--kv-event-block-size 16 --kv-event-model <served model>; the engines run "
                                 "with --kv-events-endpoint/--kv-events-replay-endpoint (ipc sockets)",
    ("vllm-router", "power_of_two"): "polls sglang-style GET /get_load every 5 s (404 on vLLM): no engine load, "
                                     "only its own view of the workers (or random)",
}


@dataclass(frozen=True)
class Contender:
    """One router + policy of a side-by-side benchmark. ``params``: ours: policy params; peers: extra CLI
    flags (``{"cache_threshold": 0.5}`` -> ``--cache-threshold 0.5``; none by default)."""

    name: str  # unique, used in tables: "cost", "sglang:cache_aware", "vllm-router:consistent_hash"
    kind: str  # "ours" | "sglang-router" | "vllm-router" | "aiohttp-floor" (`benchmarks.lib.floor_relay`)
    policy: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    notes: str = ""  # what degrades in front of vLLM-shaped engines, defaults kept
    session_header: str | None = None  # the load generator sends each session's id in this header
    workers: int = 1  # ours: router processes behind one port (``python -m router --workers K``)
    ablations: tuple[str, ...] = ()  # ours: parts taken out (`benchmarks.lib.ablations`), for `benchmarks.ablate`

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown contender kind {self.kind!r}; choose one of {', '.join(KINDS)}")

    @property
    def router_spec(self) -> RouterSpec:
        """Ours only: the config `benchmarks.lib.fleet.Fleet` would use (policy, 0.5 s load polling)."""
        return RouterSpec(policy=self.policy, params=dict(self.params))

    @property
    def needs_kv_events(self) -> bool:
        """The engines must publish KV events for this contender (ours pricing them, vllm-router kv_aware)."""
        if self.kind == "ours":
            return self.router_spec.needs_kv_events
        return self.kind == "vllm-router" and self.policy == "kv_aware"

    def argv(self, port: int, engine_urls: Sequence[str], workdir: Path, *,
             metrics_port: int | None = None, model: str = MODEL,
             kv_sources: Mapping[str, str] | None = None) -> list[str]:
        """The exact command line. Ours writes its config YAML into ``workdir``; peers get a Prometheus
        listener on ``metrics_port`` (a free loopback port if not given, so two runs never collide).
        ``kv_sources``: engine URL -> a ``tcp://`` PUB endpoint of its KV events (vllm-router kv_aware takes
        no other kind; `benchmarks.lib.kv_relay`), else the engines' own endpoints are named."""
        if self.kind == "ours":
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / f"{slug(self.name)}.yaml"
            path.write_text(yaml.safe_dump(self.router_spec.config(port, engine_urls, model)))
            argv = [sys.executable, "-m", "router", "--config", str(path)]
            if self.ablations:
                from benchmarks.lib.ablations import bootstrap

                argv[1:3] = ["-c", bootstrap(list(self.ablations))]
            return argv + ["--workers", str(self.workers)] if self.workers > 1 else argv
        if self.kind == "aiohttp-floor":
            return [sys.executable, "-m", FLOOR_MODULE, "--host", HOST, "--port", str(port), "--upstream", *engine_urls]
        argv = [sys.executable, "-m", _PEER_MODULE[self.kind], "--host", HOST, "--port", str(port),
                "--worker-urls", *engine_urls, "--policy", self.policy,
                "--prometheus-host", HOST, "--prometheus-port", str(metrics_port or free_port()),
                "--log-level", _PEER_LOG_LEVEL[self.kind]]
        if self.needs_kv_events:  # vllm-router kv_aware: each worker's event streams, as for a stock vLLM
            for url in engine_urls:
                if kv_sources is not None:
                    argv += ["--kv-event-source", f"{url}={kv_sources[url]}"]
                else:
                    pub, replay = kv_event_endpoints(url)
                    argv += ["--kv-event-source", f"{url}={pub}", "--kv-event-replay-source", f"{url}={replay}"]
            argv += ["--kv-event-block-size", "16", "--kv-event-model", model]
        for key, value in self.params.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value not in (False, None):
                argv += [flag, str(value)]
        return argv


def slug(name: str) -> str:
    """A file-name-safe form of a contender name ("sglang:cache_aware" -> "sglang-cache_aware")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "router"


def our_contenders(policies: Sequence[str] | None = None) -> list[Contender]:
    """Our router with each named policy (default: every registered policy), policy defaults."""
    from router.policies.registry import POLICY_NAMES

    names = list(policies) if policies is not None else list(POLICY_NAMES)
    for name in names:
        if name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    return [Contender(name=name, kind="ours", policy=name) for name in names]


def peer_contender(kind: str, policy: str, **params: Any) -> Contender:
    """A peer router with ``policy`` (its defaults unless ``params`` set flags), named "<peer>:<policy>"."""
    notes = "; ".join(n for n in (_POLICY_NOTES.get((kind, policy), ""), _COMMON_NOTES.get(kind, "")) if n)
    defaults = PEER_DEFAULTS.get(kind, {}).get(policy)
    if defaults and not params:
        notes += "; defaults " + ", ".join(f"{k}={v}" for k, v in defaults.items())
    return Contender(name=f"{_PEER_PREFIX[kind]}:{policy}", kind=kind, policy=policy, params=params, notes=notes)


def floor_contender() -> Contender:
    """The bare aiohttp relay (`benchmarks.lib.floor_relay`): what our stack costs with no router in it."""
    return Contender(name="aiohttp-floor", kind="aiohttp-floor", policy="round_robin",
                     notes="aiohttp server + our upstream client, round robin; no parsing, policy, metrics or "
                           "retries: the floor of a router built like ours")


def peer_contenders() -> list[Contender]:
    """sglang-router: cache_aware, round_robin, power_of_two; vllm-router: cache_aware, consistent_hash,
    power_of_two. All with the peers' default parameters."""
    return [peer_contender("sglang-router", p) for p in ("cache_aware", "round_robin", "power_of_two")] + \
        [peer_contender("vllm-router", p) for p in ("cache_aware", "consistent_hash", "power_of_two", "kv_aware")]


def peer_available(kind: str) -> str | None:
    """None if this kind of router can be started here, else why not (shown in place of its numbers)."""
    if kind in ("ours", "aiohttp-floor"):
        return None
    if kind not in _PEER_IMPORT:
        return f"unknown router kind {kind!r}"
    if importlib.util.find_spec(_PEER_IMPORT[kind]) is None:
        return f"{kind} not installed: pip install -e .[bench]"
    return None


def peer_version(kind: str) -> str | None:
    """The installed version of a peer (or of this project for "ours"); None if not installed."""
    dist = "prefix-router" if kind in ("ours", "aiohttp-floor") else kind
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- running one -----------------------------------------------------------------------------------


@dataclass
class RunningRouter:
    url: str
    pid: int
    argv: list[str]
    version: str | None
    log_path: Path


class RouterStartError(RuntimeError):
    """A router that could not be started or never routed; the message quotes its argv and log tail."""

    def __init__(self, reason: str, argv: Sequence[str] = (), log_tail: str = "") -> None:
        self.reason = reason
        self.argv = list(argv)
        self.log_tail = log_tail
        text = reason
        if argv:
            text += f"\n  argv: {shlex.join(self.argv)}"
        if log_tail:
            text += "\n  log tail:\n" + log_tail
        super().__init__(text)


def _log_tail(path: Path, chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[-chars:]  # peers colour their logs


def probe_body(model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "router start probe"}]}


async def _routes(session: aiohttp.ClientSession, url: str, model: str = MODEL) -> str | None:
    """None if `url` answers /health with 200 and streams a small chat completion; else what failed."""
    try:
        async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1.0)) as r:
            if r.status != 200:
                return f"/health answered {r.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"/health: {exc.__class__.__name__}: {exc}"
    res = await stream_chat(session, url, probe_body(model), timeout_s=5.0)
    if not res.ok:
        return f"probe chat completion failed: status {res.status}: {res.error}"
    if res.usage is None:
        return "probe chat completion streamed no usage event"
    return None


@asynccontextmanager
async def run_router(contender: Contender, engine_urls: Sequence[str], log_dir: Path, *,
                     start_timeout_s: float = 60.0, model: str = MODEL) -> AsyncIterator[RunningRouter]:
    """Start ``contender`` in front of ``engine_urls``, yield it once it routes, stop it on exit.

    Raises `RouterStartError` if it is not installed, exits, or does not route within ``start_timeout_s``.
    """
    if (why := peer_available(contender.kind)) is not None:
        raise RouterStartError(f"{contender.name}: {why}")
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{HOST}:{port}"
    with contextlib.ExitStack() as relay:  # vllm-router kv_aware: the engines' events on loopback TCP
        kv_sources = None
        if contender.kind == "vllm-router" and contender.needs_kv_events:
            from benchmarks.lib.kv_relay import KVEventRelay

            kv_sources = relay.enter_context(KVEventRelay(engine_urls)).sources
        argv = contender.argv(port, engine_urls, log_dir, model=model, kv_sources=kv_sources)
        log_path = log_dir / f"{slug(contender.name)}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
        with log_path.open("wb") as log:
            # own session: a Ctrl-C in the terminal reaches us, not the router; leftovers are killed by group
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        try:
            await _wait_routing(proc, url, argv, log_path, contender, start_timeout_s, model)
            if contender.kind == "ours":  # let it read every engine's /load, as Fleet does
                await asyncio.sleep(2 * contender.router_spec.load_poll_s + 0.1)
            yield RunningRouter(url=url, pid=proc.pid, argv=argv, version=peer_version(contender.kind),
                                log_path=log_path)
        finally:
            await _stop(proc)


async def _wait_routing(proc: subprocess.Popen[bytes], url: str, argv: list[str], log_path: Path,
                        contender: Contender, timeout_s: float, model: str = MODEL) -> None:
    deadline = time.monotonic() + timeout_s
    last = "not tried"
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                raise RouterStartError(f"{contender.name} exited with {proc.returncode} during start-up",
                                       argv, _log_tail(log_path))
            if time.monotonic() > deadline:
                raise RouterStartError(f"{contender.name} did not route within {timeout_s:g}s (last: {last})",
                                       argv, _log_tail(log_path))
            last = await _routes(session, url, model) or ""
            if not last:
                return
            await asyncio.sleep(0.1)


async def _stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, up to ``grace_s`` to exit, then SIGKILL; then kill anything left in its process group.
    The kill path also runs if this wait is cancelled."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the router's own (start_new_session)
