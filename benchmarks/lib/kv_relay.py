"""Re-publish a sim engine's KV events on a loopback TCP port, for routers that only take ``tcp://HOST:PORT``.

vllm-router (``--kv-event-source``) refuses ``ipc://`` endpoints, and an engine binds a TCP endpoint only
with the ``*`` wildcard (every interface), which benchmarks do not open. A relay binds
``tcp://127.0.0.1:<free port>`` itself and forwards the engine's ``ipc://`` PUB stream frame for frame
(``zmq.proxy`` between an XSUB and an XPUB: subscriptions flow up, batches down; sequence numbers and
payloads untouched). Replay is not relayed: the replay protocol's envelope does not survive a proxy hop;
a router that starts before the traffic, as in every benchmark run, misses nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zmq

from benchmarks.lib.defaults import HOST
from benchmarks.lib.fleet import free_port, kv_event_endpoints


class KVEventRelay:
    """One forwarding thread per engine; ``sources`` maps each engine URL to its loopback PUB endpoint."""

    def __init__(self, engine_urls: Sequence[str]) -> None:
        self.engine_urls = list(engine_urls)
        self.sources: dict[str, str] = {}
        self._ctx = zmq.Context()
        self._threads: list[tuple[threading.Thread, zmq.Socket]] = []

    def __enter__(self) -> KVEventRelay:
        for url in self.engine_urls:
            endpoint = f"tcp://{HOST}:{free_port()}"
            control_addr = f"inproc://relay-{len(self._threads)}"
            control = self._ctx.socket(zmq.PAIR)
            control.bind(control_addr)
            ready = threading.Event()
            t = threading.Thread(target=self._run, args=(kv_event_endpoints(url)[0], endpoint, control_addr, ready),
                                 daemon=True, name=f"kv-relay-{url}")
            t.start()
            ready.wait(5.0)
            self._threads.append((t, control))
            self.sources[url] = endpoint
        return self

    def __exit__(self, *exc: object) -> None:
        for t, control in self._threads:
            control.send(b"TERMINATE")
            t.join(5.0)
            control.close(linger=0)
        self._threads.clear()
        self._ctx.term()

    def _run(self, upstream: str, endpoint: str, control_addr: str, ready: threading.Event) -> None:
        xsub, xpub = self._ctx.socket(zmq.XSUB), self._ctx.socket(zmq.XPUB)
        ctl = self._ctx.socket(zmq.PAIR)
        try:
            xsub.connect(upstream)
            xpub.bind(endpoint)
            ctl.connect(control_addr)
            ready.set()
            zmq.proxy_steerable(xpub, xsub, None, ctl)
        finally:
            for s in (xsub, xpub, ctl):
                s.close(linger=0)
