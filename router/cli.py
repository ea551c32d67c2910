"""`python -m router`: run the prefix-cache-aware router in front of engine replicas."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config.router import ConfigError, RouterConfig, load_config, parse_config
from router.policies.registry import DEFAULT_POLICY, POLICY_NAMES

if TYPE_CHECKING:
    from router.reload import Reloader
    from router.runtime import Router

DESCRIPTION = """\
Prefix-cache-aware router for vLLM replicas, speaking the OpenAI API.

For every request it hashes the prompt prefix (the whole chat, system prompt and tools included), asks
the routing policy for the replica most likely to answer fastest (the default `cost` policy: queue wait +
prefill of the tokens that replica does NOT have cached), and streams the answer back as it comes.
Replicas are health-checked and their load polled; failures before the first byte are retried on
another replica.

Policies: {policies}.
Replicas: repeat --replica URL (or NAME=URL), or list them in --config FILE (YAML, see config/).
Flags given on the command line override the config file.
"""

EPILOG = """\
examples:
  python -m router --port 8000 --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002
  python -m router --config config/examples/router.yaml --policy cache_aware
  python -m router --replica a=http://127.0.0.1:8001 --policy cost --policy-param prefill_s_per_token=0.0002
  python -m router --replica http://127.0.0.1:8001 --tls-cert cert.pem --tls-key key.pem   # HTTPS
  python -m router --config router.yaml --workers 4   # four processes on one port (SO_REUSEPORT)

then point any OpenAI client at http://127.0.0.1:8000/v1
"""


def build_parser() -> argparse.ArgumentParser:
    policies = ", ".join(f"{n} (default)" if n == DEFAULT_POLICY else n for n in POLICY_NAMES)
    p = argparse.ArgumentParser(prog="python -m router", description=DESCRIPTION.format(policies=policies),
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML router config (format: config/router.py)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument("--replica", action="append", default=[], metavar="[NAME=]URL",
                   help="an engine server's base URL; repeat for each replica (names default to replica-N)")
    p.add_argument("--model", action="append", default=[],
                   help="models the --replica servers serve (default: learned from their /v1/models)")
    p.add_argument("--policy", help="routing policy (default cost)")
    p.add_argument("--policy-param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy constructor parameter; VALUE is parsed as JSON when it can be")
    p.add_argument("--block-chars", type=int, help="characters per prefix block (default 64)")
    p.add_argument("--max-attempts", type=int, help="tries on distinct replicas before giving up (default 3)")
    p.add_argument("--no-replica-header", action="store_true",
                   help="do not name the chosen replica in the x-router-replica response header")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (chain); "
                   "needs --tls-key; reloaded when the file changes")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N router processes on the port (SO_REUSEPORT), supervised: each polls the "
                        "replicas and follows their KV events itself (default 1)")
    p.add_argument("--router-processes", type=int, metavar="N",
                   help="router processes sharing the traffic, all pods' workers counted (config "
                        "router_processes; default 1, or N with --workers N): the cost policy prices the "
                        "requests in flight it cannot see by it")
    p.add_argument("--reuse-port", action="store_true",
                   help="listen with SO_REUSEPORT, so other router processes can share the port")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])
    return p


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    base = load_config(args.config).model_dump() if args.config else {}
    if args.replica:
        replicas = []
        for i, spec in enumerate(args.replica):
            name, _, url = spec.rpartition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
            entry: dict[str, Any] = {"name": name or f"replica-{i}", "url": url}
            if args.model:
                entry["models"] = list(args.model)
            replicas.append(entry)
        base["replicas"] = replicas
    for key in ("host", "port", "log_level", "log_format", "router_processes"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.policy or args.policy_param:
        policy = dict(base.get("policy") or {})
        if args.policy:
            if args.policy != policy.get("name"):
                policy["params"] = {}
            policy["name"] = args.policy
        params = dict(policy.get("params") or {})
        for kv in args.policy_param:
            if "=" not in kv:
                raise ConfigError(f"--policy-param {kv!r}: expected KEY=VALUE")
            k, v = kv.split("=", 1)
            params[k] = _value(v)
        policy["params"] = params
        base["policy"] = policy
    if args.block_chars is not None:
        base["hashing"] = {**(base.get("hashing") or {}), "block_chars": args.block_chars}
    if args.max_attempts is not None:
        base["retry"] = {**(base.get("retry") or {}), "max_attempts": args.max_attempts}
    if (args.tls_cert is None) != (args.tls_key is None) and not base.get("tls"):
        raise ConfigError("--tls-cert and --tls-key: give both (or a tls section in the config file)")
    if args.tls_cert is not None or args.tls_key is not None:
        tls = dict(base.get("tls") or {})
        if args.tls_cert is not None:
            tls["cert_file"] = args.tls_cert
        if args.tls_key is not None:
            tls["key_file"] = args.tls_key
        base["tls"] = tls
    if args.no_replica_header:
        base["replica_header"] = None
    cfg = parse_config(base)
    if not cfg.replicas:
        raise ConfigError("replicas: give at least one --replica URL or a config file listing replicas")
    return cfg


def share_metrics(router: Router, reloader: Reloader) -> asyncio.Task[None] | None:
    """In a worker of ``--workers N``: scrapes answer for all workers, and this worker's scrape-time
    values are published every second for scrapes landing on the others (`router.worker_metrics`)."""
    from router.worker_metrics import SharedMetrics, publish_every, worker_dir

    path = worker_dir()
    if path is None:
        return None
    metrics = router.metrics
    metrics.shared = shared = SharedMetrics(path)
    shared.replicas = lambda: {*router.registry.names(), *(r.name for r in reloader.retired)}

    def publish() -> None:
        metrics.mirror_replicas(router.registry.all(), time.monotonic())
        metrics.refresh()
        metrics.publish()

    return asyncio.create_task(publish_every(publish), name="worker-metrics")


def listen_to_siblings(router: Router, reloader: Reloader, parent_gone: Callable[[], None]
                       ) -> asyncio.Task[None] | None:
    """In a worker of ``--workers N``: apply the admin changes the other workers pass on (`router.siblings`).
    Their channel is the parent's pipe on stdin: when it closes, the parent is gone (killed), and a worker
    left alone calls ``parent_gone`` (drain and exit) rather than hold the port unsupervised."""
    from router import siblings

    if not siblings.connected():
        return None
    from router.admin import apply_sibling_change

    def ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            logging.getLogger("router").warning("the supervising parent is gone: this worker drains and exits")
            parent_gone()

    task = asyncio.create_task(siblings.listen(functools.partial(apply_sibling_change, router, reloader)),
                               name="sibling-changes")
    task.add_done_callback(ended)
    return task


async def serve(cfg: RouterConfig, *, config_file: str | None = None,
                config_source: Callable[[], RouterConfig] | None = None, reuse_port: bool = False) -> None:
    """Run until SIGTERM/SIGINT, then drain. With a config file, it is watched, and SIGHUP reloads it."""
    from router.app import ROUTER, create_app, harden, runner_kwargs
    from router.reload import RELOADER

    app = create_app(cfg, config_file=config_file, config_source=config_source)
    router = app[ROUTER]
    certs = None
    if cfg.tls is not None:
        from router.tls import CertReloader

        certs = CertReloader(cfg.tls, router.metrics.tls_cert_reloads)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, **runner_kwargs(cfg))
    await runner.setup()
    harden(runner)  # (start-up objects were frozen out of the collector's reach by runtime.start: gc_tuning)
    await web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True, reuse_port=reuse_port or None,
                      ssl_context=certs.context if certs is not None else None).start()
    cert_watch = asyncio.create_task(certs.watch(), name="tls-cert-watch") if certs is not None else None
    publisher = share_metrics(router, app[RELOADER])
    stop = asyncio.Event()
    listener = listen_to_siblings(router, app[RELOADER], parent_gone=stop.set)
    log = logging.getLogger("router")
    log.info("router listening on %s://%s:%d, policy %s, %d replica(s): %s",
             "https" if certs is not None else "http", cfg.host, cfg.port,
             cfg.policy.name, len(cfg.replicas), ", ".join(f"{r.name}={r.url}" for r in cfg.replicas))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not app[RELOADER].install_sighup():  # without a config file SIGHUP is logged and ignored
        log.warning("SIGHUP reload unavailable here; use POST /admin/reload")
    try:
        await stop.wait()
        router.draining = True
        grace = router.config.shutdown_grace_s  # the live value: a reload may have changed it
        deadline = time.monotonic() + grace
        log.info("shutting down: %d request(s) in flight, grace %.0fs", router.in_flight, grace)
        while router.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for task in (cert_watch, publisher, listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.workers < 1:
            raise ConfigError("--workers: must be at least 1")
        cfg = config_from_args(args)
        from router.runtime import build_policy

        build_policy(cfg)  # the registry judges the policy: fail before listening, naming the field
        from router.tracing import check_env

        check_env()  # OTEL_TRACES_EXPORTER set without the otel extra: say so before listening
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from config.logging_setup import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    if args.workers > 1:
        from router.workers import counted_argv, run_workers

        return run_workers(args.workers, counted_argv(argv, args.workers, cfg.router_processes),
                           cfg.shutdown_grace_s)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # A reload re-reads the file and re-applies the flags, so flags keep overriding the file.
    source = functools.partial(config_from_args, args) if args.config else None
    asyncio.run(serve(cfg, config_file=args.config, config_source=source, reuse_port=args.reuse_port))
    return 0
