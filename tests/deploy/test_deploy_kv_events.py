"""The CPU deploys (compose.cpu.yaml, the Kubernetes cpu-sim overlay) route on the engines' KV events.

Their sim engines publish KV cache events and their routers follow them (`kv_events` in the router config),
while the GPU deploys keep the approximate index (their router would need the model's tokenizer). Checked
on the files themselves: each CPU router config is its GPU twin plus a `kv_events` section whose tokenizer
matches the engines', and the engines publish on the ports they declare. Then live: two engines started
with the deploy's own engine arguments and a router with the deploy's own config (only addresses moved to
loopback ports) sync every replica's index and serve a repeated prompt from the cache. Waits poll for a
state, under a hang guard.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from config.router import parse_config
from tests.conftest import free_port, stop_processes
from tests.deploy.test_manifests import DEPLOY, ROOT, by_kind, compose_config, kustomize
from tests.deploy.test_prometheus_live import wait_http, wait_until

HANG_GUARD_S = 60.0
COMPOSE_CPU = DEPLOY / "compose/compose.cpu.yaml"


class Deploy(NamedTuple):
    engine: list[str]  # the engine's argv after `python -m engine_server`
    cpu: dict[str, Any]  # the CPU deploy's router config
    gpu: dict[str, Any]  # its GPU twin's
    ports: set[int] | None  # the engine container's declared ports (None: compose declares none)


def compose_sources() -> Deploy:
    services = compose_config(COMPOSE_CPU)["services"]
    engine = services["engine-0"]
    assert engine["entrypoint"] == ["python", "-m", "engine_server"]
    command = services["router"]["command"]
    mounted = Path(command[command.index("--config") + 1])
    assert mounted.parent == Path("/etc/prefix-router")
    cpu = yaml.safe_load((DEPLOY / "compose/router" / mounted.name).read_text())
    gpu = yaml.safe_load((DEPLOY / "compose/router/router.yaml").read_text())
    return Deploy(engine["command"], cpu, gpu, None)


def k8s_sources() -> Deploy:
    """The Kubernetes cpu-sim overlay, against the gpu overlay's router config."""
    objs = by_kind(kustomize("k8s/overlays/cpu-sim"))
    container = objs[("StatefulSet", "vllm-engine")]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "engine_server"]
    cpu = yaml.safe_load(objs[("ConfigMap", "prefix-router-config")]["data"]["router.yaml"])
    gpu_objs = by_kind(kustomize("k8s/overlays/gpu"))
    gpu = yaml.safe_load(gpu_objs[("ConfigMap", "prefix-router-config")]["data"]["router.yaml"])
    return Deploy(container["args"], cpu, gpu, {p["containerPort"] for p in container["ports"]})


SOURCES = {"compose": compose_sources, "k8s-cpu-sim": k8s_sources}


def flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


@pytest.mark.parametrize("deploy", SOURCES)
def test_the_cpu_router_config_is_the_gpu_one_plus_kv_events_with_the_engines_tokenizer(deploy: str) -> None:
    engine, cpu, gpu, _ = SOURCES[deploy]()
    events = cpu.pop("kv_events")
    assert cpu == gpu and "kv_events" not in gpu  # nothing else differs, so the two cannot drift apart
    cfg = parse_config({**cpu, "kv_events": events}).kv_events
    assert cfg.enabled and cfg.discover and cfg.tokenizer == "sim"
    assert flag(engine, "--backend") == "sim"
    assert cfg.sim_chars_per_token == int(flag(engine, "--chars-per-token", "4") or 4)


@pytest.mark.parametrize("deploy", SOURCES)
def test_the_cpu_engines_publish_events_and_replays_on_a_bound_tcp_port(deploy: str) -> None:
    engine, _, _, declared = SOURCES[deploy]()
    ports = []
    for name in ("--kv-events-endpoint", "--kv-events-replay-endpoint"):
        endpoint = flag(engine, name)
        assert endpoint is not None and (m := re.fullmatch(r"tcp://\*:(\d+)", endpoint)), (name, endpoint)
        ports.append(int(m.group(1)))
    assert len(set(ports)) == 2
    if declared is not None:  # on the pod, as its http port is
        assert set(ports) <= declared


# -- live ------------------------------------------------------------------------------------------------


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def index_blocks(base: str) -> float:
    """Blocks the router's exact indexes hold, summed over replicas (0 while /metrics does not answer)."""
    text = get(f"{base}/metrics") or ""
    return sum(float(v) for v in re.findall(r"^router_kv_events_blocks\{[^}]*\} (\S+)$", text, re.M))


def chat(base: str, text: str) -> dict[str, Any]:
    body = {"model": "sim-model", "max_tokens": 4, "messages": [{"role": "user", "content": text}]}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def on_loopback(argv: list[str], port: int, sockets: Path) -> list[str]:
    """The deploy's engine argv listening on a loopback port, its events on ipc:// sockets in ``sockets``
    (a `tcp://*` endpoint binds every interface, and only a `*` one is bound: vLLM's rule)."""
    out = list(argv)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    out[out.index("--kv-events-endpoint") + 1] = f"ipc://{sockets}/events"
    out[out.index("--kv-events-replay-endpoint") + 1] = f"ipc://{sockets}/replay"
    return out


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    stop_processes(procs)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("deploy", SOURCES)
def test_the_cpu_deploy_syncs_every_replica_and_serves_a_repeated_prompt_from_the_cache(
        deploy: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]],
        short_dir: Callable[[], Path]) -> None:
    engine, cfg, _, _ = SOURCES[deploy]()

    def start(name: str, *argv: str) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        processes.append(subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))

    urls = {}
    for name in ("engine-0", "engine-1"):
        port = free_port()
        start(name, "-m", "engine_server", *on_loopback(engine, port, short_dir()))
        urls[name] = f"http://127.0.0.1:{port}"
    router_port = free_port()
    cfg.pop("discovery", None)  # the pods, found by the Kubernetes API there; named here
    cfg.update(host="127.0.0.1", port=router_port, log_format="text",
               replicas=[{"name": n, "url": u} for n, u in urls.items()])
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    for url in urls.values():
        wait_http(f"{url}/health", HANG_GUARD_S)
    start("router", "-m", "router", "--config", str(tmp_path / "router.yaml"))
    base = f"http://127.0.0.1:{router_port}"

    def synced() -> bool:
        text = get(f"{base}/metrics") or ""
        return all(f'router_kv_events_status{{replica="{n}",status="synced"}} 1.0' in text for n in urls)

    wait_until(synced, "every replica's KV events synced", HANG_GUARD_S)
    prompt = "Summarise the deployment guide for the router in three sentences, please. " * 6
    first = chat(base, prompt)
    wait_until(lambda: index_blocks(base) > 0, "the first prompt's blocks in the router's exact index", HANG_GUARD_S)
    second = chat(base, prompt)
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= second["usage"]["prompt_tokens"] // 2, second["usage"]  # sent where the prefix is
