"""KV cache events on vLLM's wire, published by the simulated engine (and usable by any engine here).

vLLM (``vllm/distributed/kv_events.py``, ``--kv-events-config``) tells subscribers which prefix-cache blocks
it stores and evicts. This module speaks exactly that protocol, so a router consuming it works the same
against a stock ``vllm serve`` and against our ``sim`` backend:

* **Messages** are msgpack ``KVEventBatch`` structs, encoded as an array ``[ts, events, data_parallel_rank]``;
  each event is a map tagged ``{"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared", ...}`` with
  default-valued fields omitted. The structs (in ``kv_wire``, shared with the router) mirror vLLM's field
  for field, so the bytes are identical; a test decodes our messages with vLLM's own classes and compares
  the encodings.
* **PUB socket** (``endpoint``): every batch is one multipart message ``[topic, seq, payload]`` where
  ``seq`` is an 8-byte big-endian counter starting at 0 when the publisher starts (so a restarted engine
  shows up as a sequence that goes back).
* **ROUTER replay socket** (``replay_endpoint``, optional): a client sends ``[b"", start_seq]`` (a DEALER;
  the ROUTER sees ``[identity, b"", start_seq]``) and gets every buffered batch with ``seq >= start_seq`` as
  ``[b"", topic, seq, payload]``, then the end marker ``[b"", b"", END_SEQ, b""]`` (``END_SEQ`` is -1 as a
  signed 8-byte big-endian integer). The last ``buffer_steps`` batches are kept.
* Endpoints with ``*``, ``::``, ``ipc://`` or ``inproc://`` are bound, others connected (PUB only), as vLLM
  does. ``tcp://*:0`` is not supported here (vLLM resolves it to the node IP); use a port or ipc://.

Like vLLM's ``ZmqEventPublisher``, publishing happens on one background thread that owns both sockets
(ZMQ sockets are not thread-safe): ``publish()`` only enqueues, the thread numbers, encodes, sends and
buffers, and services replay requests between batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from engine_server.backend import LoadReport
from kv_wire import (
    END_SEQ,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

log = logging.getLogger("engine_server.kv_events")

MEDIUM_GPU = "GPU"


def block_stored(block_hashes: list[int], parent: int | None, token_ids: list[int], block_size: int,
                 group_idx: int = 0) -> BlockStored:
    """A `BlockStored` as vLLM's block pool builds it for a request without LoRA or multimodal inputs."""
    return BlockStored(block_hashes=block_hashes, parent_block_hash=parent, token_ids=token_ids,
                       block_size=block_size, lora_id=None, medium=MEDIUM_GPU, lora_name=None,
                       group_idx=group_idx)


def block_removed(block_hashes: list[int], group_idx: int = 0) -> BlockRemoved:
    return BlockRemoved(block_hashes=block_hashes, medium=MEDIUM_GPU, group_idx=group_idx)


# ---------------------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class KVEventsSettings:
    """Where and how an engine publishes (the fields of vLLM's ``KVEventsConfig`` that apply here).

    endpoint: PUB address, e.g. ``tcp://*:5557`` (bind) or ``ipc:///tmp/kv.sock``.
    replay_endpoint: ROUTER address answering replay requests; None: no replay.
    topic: first frame of every message; subscribers filter on it (vLLM's default "").
    buffer_steps: batches kept for replay (vLLM's default 10,000).
    hwm: PUB high-water mark; beyond it ZMQ drops messages for a slow subscriber (vLLM's default 100,000).
    """

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    buffer_steps: int = 10_000
    hwm: int = 100_000

    def __post_init__(self) -> None:
        if self.buffer_steps < 1 or self.hwm < 0:
            raise ValueError("buffer_steps must be >= 1 and hwm >= 0")
        for ep in (self.endpoint, self.replay_endpoint):
            if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"not a ZMQ endpoint: {ep!r} (tcp://, ipc:// or inproc://)")
            if ep == "tcp://*:0":
                raise ValueError("tcp://*:0 is not supported: give a port")

    def advertised(self, host: str | None = None) -> dict[str, Any]:
        """What a subscriber needs, with bind wildcards replaced by ``host`` when given."""
        def connectable(ep: str | None) -> str | None:
            if ep is None or host is None:
                return ep
            return ep.replace("*", host, 1) if ep.startswith("tcp://*") else ep

        return {"publisher": "zmq", "endpoint": connectable(self.endpoint),
                "replay_endpoint": connectable(self.replay_endpoint), "topic": self.topic}


def is_bind_endpoint(endpoint: str) -> bool:
    """Bind wildcard and ipc/inproc endpoints; connect to the rest (vLLM's rule)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


# ------------------------------------------------------------------------------------- publisher


class KVEventPublisher:
    """PUB + ROUTER replay publisher, frame for frame vLLM's ``ZmqEventPublisher``.

    ``publish`` is thread-safe and never blocks on the network. ``drop_seq`` is for tests: a batch whose
    sequence number it accepts is numbered and kept for replay but not sent live (a lost message).
    """

    SHUTDOWN_TIMEOUT_S = 1.0

    def __init__(self, settings: KVEventsSettings, *, data_parallel_rank: int = 0,
                 context: Any = None, drop_seq: Callable[[int], bool] | None = None) -> None:
        import zmq

        self.settings = settings
        self._dp_rank = data_parallel_rank
        self._topic = settings.topic.encode("utf-8")
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=settings.buffer_steps)
        self._drop_seq = drop_seq
        self._next_seq = 0
        self._ctx = context or zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(settings.hwm)
        self._replay = None
        try:
            if is_bind_endpoint(settings.endpoint):
                self._pub.bind(settings.endpoint)
            else:
                self._pub.connect(settings.endpoint)
            if settings.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(settings.replay_endpoint)
        except Exception:
            self._close_sockets()
            raise
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kv-events-publisher", daemon=True)
        self._thread.start()

    @property
    def published(self) -> int:
        """Batches numbered so far (the next sequence number)."""
        return self._next_seq

    def publish(self, batch: KVEventBatch) -> None:
        if not self._running:
            raise RuntimeError("publisher is closed")
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._dp_rank
        self._queue.put(batch)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every batch published so far has been sent (for tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._queue.unfinished_tasks

    def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout=self.SHUTDOWN_TIMEOUT_S + 1.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        while True:
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._service_replay()
                except Exception:
                    log.exception("error answering a KV event replay request")
            try:
                batch = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            try:
                if batch is None:
                    return
                seq = self._next_seq
                self._next_seq += 1
                payload = encoder.encode(batch)
                if self._drop_seq is None or not self._drop_seq(seq):
                    self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
            except Exception:
                log.exception("error publishing KV events")
                time.sleep(0.1)
            finally:
                self._queue.task_done()

    def _service_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            log.warning("invalid KV event replay request: %d frames", len(frames))
            return
        client_id, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        for seq, payload in self._buffer:
            if seq >= start:
                self._replay.send_multipart((client_id, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client_id, b"", b"", END_SEQ, b""))


@dataclass(frozen=True, slots=True)
class KVEventsLoadReport(LoadReport):
    """`/load` plus where this engine publishes its KV events (the block size is already in it), so a
    router can subscribe from what it polls anyway (`router.kv_events.subscriber.EventSource.from_load`)."""

    kv_events: KVEventsSettings | None = None

    def to_json(self) -> dict[str, Any]:
        out = LoadReport.to_json(self)
        if self.kv_events is not None:
            out["kv_events"] = self.kv_events.advertised()
        return out


def with_kv_events(report: LoadReport, settings: KVEventsSettings | None) -> LoadReport:
    """``report`` advertising ``settings`` (unchanged when publishing is off). Any backend can use it."""
    if settings is None:
        return report
    return KVEventsLoadReport(**{f.name: getattr(report, f.name) for f in fields(LoadReport)},
                              kv_events=settings)
