"""Live config reload: validate, diff, swap, and keep what the router has learned.

Three triggers share one path, `Reloader.update`, serialized by a lock: the config file changing
(polled), SIGHUP (installed by `router.cli.serve`), and ``POST /admin/reload``. The admin API's replica
edits take the same path, so ``router.config`` is always the config being served ("effective config").

`apply_config` works in two phases:

1. Prepare. This may fail and changes nothing. With `router.runtime`'s builders (the ones the router
   started from) it builds the new replicas, builds a new policy only when the policy's name or params
   changed (or the block hashing, which its index is keyed by, or the router process count it prices
   by), and derives the dispatcher settings.
   A failure is a `ConfigError` naming the field.
2. Commit. This is synchronous (no ``await``), so no request sees half a config:
   - removed replicas are marked draining and leave the registry, so nothing new picks them. Their
     in-flight requests finish on their leases (the dispatcher holds the `ReplicaState`, not the name);
   - a replica whose url changed is removed and added again (a different engine has a different cache);
   - models, weight and labels change in place;
   - a kept policy only hears ``on_replica_added/removed``, so the prefix index of replicas that stay
     survives (production-stack's reload rebuilds its router and loses its trie);
   - a new `Dispatcher` (policy + settings) replaces the old one in one reference swap. Requests
     already running keep the dispatcher they started with, so a request's ``on_complete`` always goes
     to the policy that made its decision;
   - ``router.config`` is swapped last.

Fields a running process cannot change (listen address, body limit, log format) keep their running
values in the effective config and are reported as ``needs_restart``; they are never silently dropped.
Poll intervals restart the poller's loops after the swap. Other sections (auth, limits) are read from
``router.config`` by their owners, so they apply with the swap.

Why the file is polled (read and hashed every ``watch_interval_s``, 1 s by default) rather than watched
with watchfiles/inotify: Kubernetes ConfigMaps and most deploy tools replace the file by a rename or a
symlink flip, which drops an inotify watch on the old inode; a path read every second sees every
version. Hashing the content, not just comparing mtime and size, also catches a same-size rewrite
inside the filesystem's timestamp granularity, and ignores a touch. A config file is a few KB, so the
read costs nothing, and it needs no thread and no extra dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from config.router import ConfigError, ReplicaConfig, RouterConfig, load_config
from router.dispatch import Dispatcher
from router.policies.base import Policy
from router.replicas.state import ReplicaState
from router.runtime import (
    Router,
    block_hashing,
    build_policy,
    build_replicas,
    dispatch_settings,
    health_config,
)

log = logging.getLogger("router.reload")

# Top-level fields bound when the process starts (socket, aiohttp body limit, log handler).
# discovery: its watch is configured when it starts. passthrough_paths: routes added at start. tls: the socket's context (a renewed certificate
# in the same files is picked up without a restart, by router.tls.CertReloader).
RESTART_FIELDS: tuple[str, ...] = ("host", "port", "max_body_bytes", "log_format", "discovery",
                                   "client_timeouts", "tls", "kv_events", "passthrough_paths")

ConfigSource = Callable[[], RouterConfig]
ConfigEdit = Callable[[RouterConfig], RouterConfig]
ReplicaSource = Callable[[], tuple[ReplicaConfig, ...] | None]


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    """What one reload did (``ok``) or why it was refused (``error``; the old config stays).

    added / removed: replica names; replaced: url changed, so drained and re-created; updated: models,
    weight or labels changed in place. changed: top-level config fields that differ. needs_restart:
    changed fields that keep their running value until a restart. retired: the removed `ReplicaState`s,
    possibly still finishing requests (not serialized).
    """

    ok: bool
    trigger: str = ""
    generation: int = 0
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    policy_replaced: bool = False
    needs_restart: tuple[str, ...] = ()
    error: str | None = None
    retired: tuple[ReplicaState, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "retired"}


async def apply_config(router: Router, new: RouterConfig) -> ReloadResult:
    """Make ``new`` the running config of a started router (see the module docstring).

    Raises `ConfigError` when ``new`` cannot be applied; nothing has changed then."""
    dispatcher = router.dispatcher
    if dispatcher is None:
        raise ConfigError("the router has not started yet; nothing to reload into")
    old = router.config
    restart = tuple(f for f in RESTART_FIELDS if getattr(new, f) != getattr(old, f))
    effective = new.model_copy(update={f: getattr(old, f) for f in restart})
    if not effective.replicas:
        raise ConfigError("replicas: the new config lists no replica; refusing to route to none")

    # -- prepare: everything that can fail ---------------------------------------------------------
    registry = router.registry
    current = {r.name: r for r in registry.all()}
    wanted = {rc.name: (i, rc) for i, rc in enumerate(effective.replicas)}
    removed = tuple(n for n in current if n not in wanted)
    added = tuple(n for n in wanted if n not in current)
    replaced = tuple(n for n, (_, rc) in wanted.items() if n in current and current[n].url != rc.url)
    updated = tuple(n for n, (_, rc) in wanted.items()
                    if n in current and n not in replaced
                    and (current[n].models, current[n].weight, current[n].labels)
                    != (frozenset(rc.models), rc.weight, dict(rc.labels)))
    health = health_config(effective)
    fresh = build_replicas(effective, (*added, *replaced))
    new_policy = (effective.policy != old.policy or effective.hashing != old.hashing
                  or effective.router_processes != old.router_processes)
    policy: Policy = build_policy(effective) if new_policy else dispatcher.policy
    settings = dispatch_settings(effective)

    # -- commit: synchronous from here on ----------------------------------------------------------
    retired: list[ReplicaState] = []
    for name in (*removed, *replaced):
        replica = registry.remove(name)
        replica.health.set_draining(True, source="reload")
        if not new_policy:  # a new policy never knew it
            policy.on_replica_removed(name)
        retired.append(replica)
    for name in updated:
        _, rc = wanted[name]
        replica = current[name]
        replica.models, replica.weight, replica.labels = frozenset(rc.models), rc.weight, dict(rc.labels)
    if health != health_config(old):
        for replica in registry.all():
            replica.health.config = health
    for name, replica in fresh.items():
        registry.add(replica)
        if not new_policy:
            policy.on_replica_added(name)
    if new_policy:
        for name in registry.names():
            policy.on_replica_added(name)
    if effective.hashing != old.hashing:
        router.hashing = block_hashing(effective)
    if new_policy or settings != dispatcher.settings:
        router.dispatcher = Dispatcher(registry, policy, dispatcher.pool, router.metrics, settings,
                                       dispatcher.tracing)
        if router.dispatcher.budget.same_limits(dispatcher.budget):  # keep the window's counts
            router.dispatcher.budget = dispatcher.budget
    if effective.log_level != old.log_level:
        logging.getLogger().setLevel(effective.log_level.upper())
    router.config = effective

    # -- after the swap: the poller's loop periods are fixed when its loops start ------------------
    poller = router.poller
    if poller is not None:
        poller.timeout_s = effective.health.check_timeout_s  # read per probe
        periods = (effective.health.check_interval_s, effective.load.poll_interval_s)
        if periods != (poller.health_interval_s, poller.load_interval_s):
            poller.health_interval_s, poller.load_interval_s = periods
            if poller.running:
                await poller.stop()
                await poller.start()
    changed = tuple(f for f in type(new).model_fields if getattr(new, f) != getattr(old, f))
    return ReloadResult(ok=True, added=added, removed=removed, replaced=replaced, updated=updated,
                        changed=changed, policy_replaced=new_policy, needs_restart=restart,
                        retired=tuple(retired))


class Reloader:
    """Owns the config generation and the reload triggers; applies one change at a time.

    path: the config file to watch (None: no file; reloads then need ``source``).
    source: how to build the config from scratch; default ``load_config(path)``. The CLI passes one
        that re-applies its command-line flags, so flags keep overriding the file after a reload.
    watch_interval_s: how often the file is read and hashed, and finished retired replicas pruned.
    """

    def __init__(self, router: Router, *, path: str | Path | None = None, source: ConfigSource | None = None,
                 watch_interval_s: float = 1.0) -> None:
        self.router = router
        self.path = Path(path) if path is not None else None
        self.source = source or (partial(load_config, self.path) if self.path is not None else None)
        self.watch_interval_s = watch_interval_s
        self.generation = 1
        self.last: ReloadResult | None = None
        self.retired: list[ReplicaState] = []  # removed replicas that may still be finishing requests
        self._lock = asyncio.Lock()
        self._digest = self._read_digest()  # the file the router started from
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[ReloadResult]] = set()
        self._closed = False  # the app is shutting down: a late SIGHUP must not restart the poller
        # Set by replica discovery: a reload from source keeps the discovered replicas (None: none yet).
        self.replica_source: ReplicaSource | None = None
        router.metrics.config_generation.set(self.generation)

    @property
    def can_reload(self) -> bool:
        return self.source is not None

    async def reload(self, trigger: str) -> ReloadResult:
        """Rebuild the config from its source and apply it. ``trigger``: "file", "sighup", "api"."""
        source = self.source
        if source is None:
            raise RuntimeError("no config file to reload from")

        def from_source(_: RouterConfig) -> RouterConfig:
            self._digest = self._read_digest()  # the version being loaded; the watcher skips it
            cfg = source()
            discovered = self.replica_source() if self.replica_source is not None else None
            return cfg if discovered is None else cfg.model_copy(update={"replicas": discovered})

        return await self.update(from_source, trigger)

    async def update(self, edit: ConfigEdit, trigger: str) -> ReloadResult:
        """Apply ``edit(running config)``. A `ValueError` (ConfigError included) from the edit or from
        `apply_config` is reported in the result (and logged and counted); the old config stays."""
        async with self._lock:
            try:
                result = await apply_config(self.router, edit(self.router.config))
            except ValueError as exc:
                return self._refused(trigger, str(exc))
            except Exception as exc:  # a bug, not a bad file: still keep serving
                log.exception("config change (%s) failed unexpectedly", trigger)
                return self._refused(trigger, f"internal error: {exc.__class__.__name__}: {exc}")
            self.generation += 1
            result = dataclasses.replace(result, trigger=trigger, generation=self.generation)
            self.last = result
            self.retired.extend(result.retired)
            self.router.metrics.config_reloads.labels("ok").inc()
            self.router.metrics.config_generation.set(self.generation)
            log.info("config generation %d applied (%s): changed %s; replicas added %s removed %s "
                     "updated %s replaced %s; policy %s", self.generation, trigger,
                     list(result.changed) or "nothing", list(result.added), list(result.removed),
                     list(result.updated), list(result.replaced),
                     "replaced" if result.policy_replaced else "kept")
            if result.needs_restart:
                log.warning("config fields %s changed but only take effect after a restart",
                            ", ".join(result.needs_restart))
            return result

    def trigger(self, trigger: str = "sighup") -> None:
        """Start a reload in the background; for signal handlers, which cannot await."""
        if self._closed:
            return
        if not self.can_reload:
            log.warning("%s: no config file to reload from; ignored", trigger)
            return
        task = asyncio.get_running_loop().create_task(self.reload(trigger), name=f"config-reload-{trigger}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def install_sighup(self) -> bool:
        """Reload on SIGHUP, via the running loop (safe: the handler runs as a loop callback).
        False where impossible (no SIGHUP on Windows, or not the main thread)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.trigger, "sighup")
        except (AttributeError, NotImplementedError, RuntimeError, ValueError):
            return False
        return True

    def remove_sighup(self) -> None:
        with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def prune(self) -> None:
        """Forget retired replicas whose last request has ended, and all their per-replica series."""
        metrics, still = self.router.metrics, []
        for replica in self.retired:
            if replica.in_flight_requests > 0:
                still.append(replica)
            elif replica.name not in self.router.registry:  # not re-added under the same name
                metrics.forget_replica(replica.name)
        self.retired = still

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """`cleanup_ctx` entry: the watch task runs while the app does (after the router's own setup)."""
        self._task = asyncio.create_task(self._watch(), name="config-watch")
        yield
        self._closed = True
        tasks = [self._task, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def file_changed(self) -> bool:
        """True when the file's content differs from the version last loaded (a missing file: False)."""
        digest = self._read_digest()
        return digest is not None and digest != self._digest

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval_s)
            try:
                self.prune()
                if self.path is not None and self.file_changed():
                    await self.reload("file")
            except Exception:  # never let one bad tick end the watch
                log.exception("config watch tick failed")

    def _read_digest(self) -> str | None:
        if self.path is None:
            return None
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:  # mid-rename or deleted: keep the running config, look again next tick
            return None

    def _refused(self, trigger: str, error: str) -> ReloadResult:
        result = ReloadResult(ok=False, trigger=trigger, generation=self.generation, error=error)
        self.last = result
        self.router.metrics.config_reloads.labels("error").inc()
        log.error("config change (%s) refused, still running generation %d: %s", trigger, self.generation,
                  error)
        return result


RELOADER = web.AppKey("reloader", Reloader)
