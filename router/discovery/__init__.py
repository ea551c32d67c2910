"""Replica discovery: where the replica list comes from.

``static``: the config's ``replicas`` list (nothing runs). ``kubernetes``: `router.discovery.kubernetes`
watches pods or EndpointSlices and hands each new replica set to a `ReplicaSetApplier`, which applies it
the way a config reload does: ``Reloader.update`` with the running config's ``replicas`` replaced, so a
discovered change is validated, swapped atomically, drains removed replicas, keeps the policy's learned
state, and is logged and counted like any reload (trigger ``discovery``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from config.router import RouterConfig
from router.discovery.applier import ReplicaSetApplier

if TYPE_CHECKING:
    from router.reload import Reloader

__all__ = ["ReplicaSetApplier", "setup_discovery"]


def setup_discovery(app: web.Application, cfg: RouterConfig, reloader: Reloader) -> None:
    """Run the configured discovery while the app runs. Call after `setup_admin` (needs the dispatcher)."""
    if cfg.discovery.kind != "kubernetes":
        return
    from router.discovery.kubernetes import KubernetesDiscovery  # late: kubernetes-asyncio is optional

    discovery = KubernetesDiscovery(cfg.discovery, ReplicaSetApplier(reloader, debounce_s=cfg.discovery.debounce_s))

    async def context(_: web.Application) -> AsyncIterator[None]:
        await discovery.start()
        yield
        await discovery.stop()

    app.cleanup_ctx.append(context)
