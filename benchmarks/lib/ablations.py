"""Parts of our router that `benchmarks.ablate` can take out, one function each, applied in the router's
own process before it starts (`bootstrap`).

Each ablation patches the router's modules so one part does (almost) nothing, to measure what that part
costs per request; none is a supported way to run the router. They name the router's internals, so a
rename there fails `tests/benchmarks/test_ablate.py`, which starts a router with every ablation.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

ABLATIONS: dict[str, tuple[str, Callable[[], None]]] = {}


def ablation(name: str, what: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        ABLATIONS[name] = (what, fn)
        return fn
    return register


def bootstrap(names: list[str]) -> str:
    """`python -c` code: apply ``names`` (in order), then run the router's CLI with the remaining argv."""
    return (f"from benchmarks.lib.ablations import apply; apply({names!r}); "
            "import sys; from router.cli import main; sys.exit(main())")


def apply(names: list[str]) -> None:
    for name in names:
        ABLATIONS[name][1]()


@ablation("no-metrics", "Prometheus counters, histograms and gauges do not count")
def _no_metrics() -> None:
    import prometheus_client.metrics as m

    m.Counter.inc = lambda self, amount=1, exemplar=None: None  # type: ignore[method-assign]
    m.Histogram.observe = lambda self, amount, exemplar=None: None  # type: ignore[method-assign]
    m.Gauge.set = lambda self, value: None  # type: ignore[method-assign]


@ablation("no-features", "each kind of request's prompt is parsed and hashed once, then reused")
def _no_features() -> None:
    import router.app as app

    first = app.features_from_body
    seen: dict[str, Any] = {}

    def cached(body: Any, kind: Any, request_id: str, hashing: Any, affinity_key: str | None = None) -> Any:
        if kind not in seen:
            seen[kind] = first(body, kind, request_id, hashing, affinity_key=affinity_key)
        return dataclasses.replace(seen[kind], request_id=request_id)

    app.features_from_body = cached  # type: ignore[assignment]


@ablation("no-access-control", "no API-key and limits middlewares (the body is still read before the handler)")
def _no_access_control() -> None:
    import router.app as app

    def body_only(web_app: Any, config: Any, metrics: Any, *, clock: Any = None, before_admission: Any = None) -> None:
        if before_admission is not None:
            web_app.middlewares.append(before_admission)

    app.install_access_control = body_only  # type: ignore[assignment]


@ablation("no-body-first", "the body is read by the handler, not by a middleware before admission")
def _no_body_first() -> None:
    from aiohttp import web

    import router.app as app

    @web.middleware
    async def passthrough(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request)

    app.read_body_first = passthrough


@ablation("no-admin", "no admin API and no discovery routes")
def _no_admin() -> None:
    import router.app as app
    from router.reload import RELOADER

    def reloader_only(web_app: Any, reloader: Any) -> None:
        web_app[RELOADER] = reloader

    app.setup_admin = reloader_only  # type: ignore[assignment]
    app.setup_discovery = lambda web_app, cfg, reloader: None  # type: ignore[assignment]


@ablation("no-polling", "no health checks and no /load polls of the replicas")
def _no_polling() -> None:
    import router.replicas.poller as poller

    async def idle(self: Any) -> None:
        return None

    poller.ReplicaPoller.start = idle  # type: ignore[method-assign]


@ablation("no-usage", "the stream is relayed without reading its usage event")
def _no_usage() -> None:
    import router.dispatch as dispatch
    from benchmarks.lib.floor_relay import copy_body
    from router.proxy.relay import RelayResult

    async def relay(upstream: Any, client: Any, idle_s: float, strip_usage_event: bool,
                    result: RelayResult | None = None) -> RelayResult:
        result = RelayResult() if result is None else result
        result.first_byte_at = await copy_body(upstream, client)
        return result

    dispatch.relay_sse = relay  # type: ignore[assignment]


@ablation("no-feedback", "outcomes are not fed back (no policy learning, health or in-flight release)")
def _no_feedback() -> None:
    import router.routing as routing

    routing.RoutingCore.complete = lambda self, *args, **kwargs: None  # type: ignore[method-assign]


@ablation("floor-handler", "the floor relay's handler (`benchmarks.lib.floor_relay`) serves chat completions "
                           "inside the router: everything around the handler kept")
def _floor_handler() -> None:
    from aiohttp import web

    import router.app as app
    from benchmarks.lib.floor_relay import relay_once
    from router.proxy.http1 import UpstreamPool

    state: dict[str, Any] = {}

    async def chat(request: web.Request) -> web.StreamResponse:
        router = request.app[app.ROUTER]
        if not state:
            state["pool"] = UpstreamPool()
            state["turn"] = itertools.cycle([r.url for r in router.registry.all()])
        return await relay_once(request, state["pool"], next(state["turn"]))

    app.chat_completions = chat  # type: ignore[assignment]
