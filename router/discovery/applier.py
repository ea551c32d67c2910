"""`ReplicaSetApplier`: the one way a discovery source changes the replica list (see `router.discovery`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from config.router import ReplicaConfig, RouterConfig

if TYPE_CHECKING:
    from router.reload import Reloader, ReloadResult

log = logging.getLogger("router.discovery")


class ReplicaSetApplier:
    """Applies the latest discovered replica set through the reload path, debounced.

    `submit` only records the wanted set; a background task applies it ``debounce_s`` after the first
    change of a burst, so a rollout of N pods costs a few reloads, not N. An empty set is not applied
    (the router keeps its last replicas rather than route to none). While running, a reload from the
    config file keeps the discovered replicas (``Reloader.replica_source``).
    """

    def __init__(self, reloader: Reloader, *, debounce_s: float = 0.2) -> None:
        self.reloader = reloader
        self.debounce_s = debounce_s
        self.desired: tuple[ReplicaConfig, ...] | None = None  # None: nothing discovered yet
        self.last: ReloadResult | None = None
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, replicas: Iterable[ReplicaConfig]) -> None:
        """Record the full wanted replica set (sorted by name); applied after the debounce delay."""
        self.desired = tuple(sorted(replicas, key=lambda r: r.name))
        self._pending.set()

    def discovered(self) -> tuple[ReplicaConfig, ...] | None:
        """The replicas a file reload should keep: the last non-empty discovered set, if any."""
        return self.desired or None

    async def apply_now(self) -> ReloadResult | None:
        """Apply ``desired`` if it differs from the running replicas; None when nothing was applied."""
        desired = self.desired
        if desired is None:
            return None
        if not desired:
            log.warning("discovery found no ready replica; keeping the current %d",
                        len(self.reloader.router.config.replicas))
            return None
        if desired == self.reloader.router.config.replicas:
            return None

        def with_replicas(cfg: RouterConfig) -> RouterConfig:
            return cfg.model_copy(update={"replicas": desired})

        self.last = await self.reloader.update(with_replicas, "discovery")
        return self.last

    def start(self) -> None:
        self.reloader.replica_source = self.discovered
        self._task = asyncio.create_task(self._run(), name="discovery-apply")

    async def stop(self) -> None:
        if self.reloader.replica_source == self.discovered:
            self.reloader.replica_source = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            await asyncio.sleep(self.debounce_s)
            self._pending.clear()
            try:
                await self.apply_now()
            except Exception:  # never let one bad change end discovery
                log.exception("applying the discovered replica set failed")
