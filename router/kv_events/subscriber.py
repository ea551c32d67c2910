"""The I/O half: ZMQ subscriptions to engines' KV events feeding a `PreciseIndex` (asyncio + zmq.asyncio).

Per replica, one task owns three sockets:

- a SUB socket connected to the engine's PUB ``endpoint`` and subscribed to its ``topic``;
- a monitor of that SUB socket: a (re)connection starts a full resync, a disconnection marks the replica
  stale (`EventSync` decides; this module only carries messages);
- a DEALER connected to the engine's ROUTER ``replay_endpoint``, created on the first replay and dropped
  after a timeout (so a late answer cannot mix with the next replay) and on every reconnection.

While a replay runs, live messages wait in the SUB socket's queue (ZMQ buffers them), so the sync core
sees one input at a time. When the stream has been idle for ``idle_probe_s``, the task asks for a replay
from the next expected sequence: that finds a last batch lost live, which no later gap would reveal.

Use `KVEventHub` as an async context manager: ``add`` a replica's `EventSource`, ``remove`` it, read
``hub.index``. Nothing here is global; the hub owns its ZMQ context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kv_wire import END_SEQ, decode_batch, decode_seq
from router.kv_events.precise import PreciseIndex
from router.kv_events.sync import EventSync

log = logging.getLogger("router.kv_events")

SUB_HWM = 100_000  # as vLLM's PUB side: a long replay should not make ZMQ drop the live messages behind it


@dataclass(frozen=True, slots=True)
class EventSource:
    """Where one replica publishes, and what its blocks look like.

    block_size: the engine's KV block size in tokens (must match, or every event is ignored).
    model: the served model name (root of the key chain; a LoRA adapter's blocks use the adapter name).
    """

    replica: str
    endpoint: str
    block_size: int
    model: str
    replay_endpoint: str | None = None
    topic: str = ""

    @classmethod
    def from_load(cls, replica: str, replica_url: str, load: Mapping[str, Any]) -> EventSource | None:
        """From an engine's ``/load`` JSON (``kv_events`` + ``block_size``); None if it advertises none.

        A bind wildcard (``tcp://*:5557``) is replaced by the replica URL's host.
        """
        info = load.get("kv_events")
        if not isinstance(info, Mapping) or not info.get("endpoint") or not load.get("block_size"):
            return None
        host = urlsplit(replica_url).hostname or "127.0.0.1"

        def connectable(ep: str | None) -> str | None:
            if ep and ep.startswith("tcp://*"):
                return ep.replace("*", host, 1)
            return ep

        return cls(replica=replica, endpoint=connectable(info["endpoint"]) or "",
                   replay_endpoint=connectable(info.get("replay_endpoint")), topic=info.get("topic") or "",
                   block_size=int(load["block_size"]), model=str(load.get("model") or ""))


class ReplicaSubscriber:
    """Follows one engine's event stream into its `EventSync` until cancelled."""

    def __init__(self, source: EventSource, sync: EventSync, ctx: zmq.asyncio.Context, *,
                 replay_timeout_s: float = 5.0, idle_probe_s: float = 2.0) -> None:
        self.source = source
        self.sync = sync
        self.replay_timeout_s = replay_timeout_s
        self.idle_probe_s = idle_probe_s
        self.decode_errors = 0
        self._ctx = ctx
        self._dealer: zmq.asyncio.Socket | None = None

    async def run(self) -> None:
        src = self.source
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, src.topic.encode("utf-8"))
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, SUB_HWM)  # live messages wait here while a replay runs
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            sub.connect(src.endpoint)
            while True:
                ready = dict(await poller.poll(timeout=self.idle_probe_s * 1000))
                if not ready:
                    if src.replay_endpoint is None:
                        continue  # nothing to ask
                    start = self.sync.probe()
                    if start is not None:
                        await self._replay(start)
                    continue
                if monitor in ready:
                    event = parse_monitor_message(await monitor.recv_multipart())["event"]
                    if event == zmq.EVENT_CONNECTED:
                        log.info("kv events: %s connected, resyncing", src.replica)
                        self._drop_dealer()  # a fresh one for a possibly restarted engine
                        await self._replay(self.sync.on_connected())
                    elif event == zmq.EVENT_DISCONNECTED:
                        log.warning("kv events: %s disconnected, its index is stale", src.replica)
                        self.sync.on_disconnected()
                    continue  # recheck: a connection event orders before what follows it
                if sub in ready:
                    frames = await sub.recv_multipart()
                    if len(frames) != 3:
                        self.decode_errors += 1
                        continue
                    try:
                        seq, batch = decode_seq(frames[1]), decode_batch(frames[2])
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        self.decode_errors += 1  # the next batch shows a gap; the replay decides
                        continue
                    start = self.sync.on_live(seq, batch)
                    if start is not None:
                        await self._replay(start)
        finally:
            with contextlib.suppress(Exception):
                sub.disable_monitor()
            monitor.close(0)
            sub.close(0)
            self._drop_dealer()

    async def _replay(self, start: int) -> None:
        """Run the replay the sync asked for, feeding it the answer (or its failure)."""
        if self.source.replay_endpoint is None:
            self.sync.on_replay_end(ok=False)
            return
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.connect(self.source.replay_endpoint)
        dealer = self._dealer
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replay_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or not await dealer.poll(remaining * 1000):
                log.warning("kv events: %s replay from %d timed out", self.source.replica, start)
                self._drop_dealer()
                self.sync.on_replay_end(ok=False)
                return
            frames = await dealer.recv_multipart()
            if len(frames) != 4:
                self.decode_errors += 1
                continue
            if frames[2] == END_SEQ:
                self.sync.on_replay_end(ok=True)
                return
            try:
                seq, batch = decode_seq(frames[2]), decode_batch(frames[3])
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.decode_errors += 1
                continue
            self.sync.on_replay(seq, batch)

    def _drop_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close(0)
            self._dealer = None


class KVEventHub:
    """Subscriptions for a set of replicas, feeding one `PreciseIndex`. ``async with KVEventHub() as hub``."""

    def __init__(self, index: PreciseIndex | None = None, *, replay_timeout_s: float = 5.0,
                 idle_probe_s: float = 2.0) -> None:
        self.index = index or PreciseIndex()
        self.replay_timeout_s = replay_timeout_s
        self.idle_probe_s = idle_probe_s
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.subscribers: dict[str, ReplicaSubscriber] = {}

    async def __aenter__(self) -> KVEventHub:
        self._ctx = zmq.asyncio.Context()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name in list(self._tasks):
            await self.remove(name)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def add(self, source: EventSource) -> EventSync:
        """Subscribe to a replica (a replica already present is replaced: fresh index, fresh sockets)."""
        if self._ctx is None:
            raise RuntimeError("KVEventHub is not started (use `async with`)")
        old = self._tasks.pop(source.replica, None)
        if old is not None:
            old.cancel()
        sync = self.index.add_replica(source.replica, source.block_size, source.model)
        sub = ReplicaSubscriber(source, sync, self._ctx, replay_timeout_s=self.replay_timeout_s,
                                idle_probe_s=self.idle_probe_s)
        self.subscribers[source.replica] = sub
        self._tasks[source.replica] = asyncio.create_task(self._guard(sub), name=f"kv-events-{source.replica}")
        return sync

    async def remove(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self.subscribers.pop(name, None)
        self.index.remove_replica(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _guard(self, sub: ReplicaSubscriber) -> None:
        """Keep a subscription alive: a crash marks the replica stale and restarts it after a pause."""
        while True:
            try:
                await sub.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kv events: subscriber for %s crashed; restarting", sub.source.replica)
                sub.sync.on_disconnected()
                await asyncio.sleep(1.0)
