"""Kubernetes discovery against a fake API server speaking the list/watch shape (pods, EndpointSlices)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes_asyncio import client

from config.router import ConfigError, DiscoveryConfig, parse_config
from router.app import ROUTER, create_app
from router.discovery import ReplicaSetApplier
from router.discovery.kubernetes import KubernetesDiscovery
from router.reload import RELOADER
from tests.conftest import SimServerFactory

NS, SELECTOR = "llm", "app=vllm"


def pod(name: str, ip: str = "10.0.0.1", *, ready: bool = True, phase: str = "Running",
        port: int = 8000) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "labels": {"app": "vllm"}},
            "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeKube:
    """Enough of the API server: LIST returns items + resourceVersion; WATCH streams queued events."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: dict[str, dict[str, Any]] = {}
        self.version = 100
        self.watchers: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.lists: list[dict[str, str]] = []
        self.watches: list[dict[str, str]] = []
        self.auth: list[str | None] = []
        self.gone_next_watch = False
        self.fail_status: int | None = None  # answer every request with this status
        self.failures = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"/api/v1/namespaces/{NS}/pods", self.handle)
        app.router.add_get(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.auth.append(request.headers.get("Authorization"))
        assert query.get("labelSelector") == SELECTOR
        if self.fail_status is not None:
            self.failures += 1
            return web.json_response({"kind": "Status", "code": self.fail_status}, status=self.fail_status)
        if query.get("watch") != "true":
            self.lists.append(query)
            return web.json_response({"kind": self.kind, "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.version)},
                                      "items": list(self.items.values())})
        self.watches.append(query)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if self.gone_next_watch:  # what the API server says for a compacted resourceVersion
            self.gone_next_watch = False
            await resp.write(json.dumps({"type": "ERROR", "object": {
                "kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}).encode() + b"\n")
            return resp
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.watchers.append(queue)
        try:
            while (event := await queue.get()) is not None:
                await resp.write(json.dumps(event).encode() + b"\n")
        finally:
            self.watchers.remove(queue)
        return resp

    def emit(self, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.items.pop(obj["metadata"]["name"], None)
        else:
            self.items[obj["metadata"]["name"]] = obj
        for q in self.watchers:
            q.put_nowait({"type": kind, "object": obj})

    def close_watches(self) -> None:
        for q in self.watchers:
            q.put_nowait(None)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


Setup = Callable[..., Awaitable[tuple[FakeKube, TestServer, KubernetesDiscovery]]]


@pytest.fixture
async def discovered(aiohttp_server: Any) -> AsyncIterator[Setup]:
    """A fake API server, a started router with no replicas, and discovery wired between them."""
    started: list[tuple[FakeKube, TestServer, KubernetesDiscovery]] = []

    async def setup(resource: str = "pods", pods: tuple[dict[str, Any], ...] = (),
                    **disc: Any) -> tuple[FakeKube, TestServer, KubernetesDiscovery]:
        fake = FakeKube("PodList" if resource == "pods" else "EndpointSliceList")
        for p in pods:
            fake.items[p["metadata"]["name"]] = p
        kube = await aiohttp_server(fake.app())
        router = TestServer(create_app(parse_config({"health": {"check_interval_s": 3600}})),
                            host="127.0.0.1", handler_cancellation=True)
        await router.start_server()
        cfg = DiscoveryConfig(kind="kubernetes", namespace=NS, label_selector=SELECTOR, resource=resource,
                              **({"port": 8000} | disc))
        conf = client.Configuration(host=str(kube.make_url("")).rstrip("/"))
        disco = KubernetesDiscovery(cfg, ReplicaSetApplier(router.app[RELOADER], debounce_s=0.02),
                                    configuration=conf, min_backoff_s=0.02, max_backoff_s=0.1)
        await disco.start()
        started.append((fake, router, disco))
        return fake, router, disco

    yield setup
    for fake, router, disco in started:
        await disco.stop()
        fake.close_watches()
        await router.close()


def names(server: TestServer) -> set[str]:
    return set(server.app[ROUTER].registry.names())


async def test_list_then_watch_added_modified_deleted(discovered: Setup) -> None:
    fake, server, disco = await discovered(pods=(pod("a", "10.0.0.1"), pod("b", "10.0.0.2"),
                                                 pod("pending", "10.0.0.9", phase="Pending")))
    await until(lambda: names(server) == {"a", "b"})
    assert server.app[ROUTER].registry.get("a").url == "http://10.0.0.1:8000"
    assert fake.lists and fake.watches[0]["resourceVersion"] == "100"
    reloader = server.app[RELOADER]
    generation = reloader.generation

    await until(lambda: bool(fake.watchers))
    fake.emit("ADDED", pod("c", "10.0.0.3"))
    await until(lambda: names(server) == {"a", "b", "c"})
    assert reloader.generation == generation + 1
    assert reloader.last is not None and reloader.last.trigger == "discovery"

    fake.emit("MODIFIED", pod("b", "10.0.0.2", ready=False))
    await until(lambda: names(server) == {"a", "c"})
    assert reloader.last is not None and reloader.last.removed == ("b",)
    retired = [r for r in reloader.retired if r.name == "b"]
    assert retired and retired[0].health.draining

    terminating = pod("c", "10.0.0.3")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    fake.emit("MODIFIED", terminating)
    await until(lambda: names(server) == {"a"})
    fake.emit("ADDED", pod("d", "10.0.0.4"))
    fake.emit("DELETED", pod("d", "10.0.0.4"))
    await until(lambda: disco.applier.desired is not None and len(disco.applier.desired) == 1)
    fake.emit("DELETED", pod("a", "10.0.0.1"))  # the last one: kept rather than route to none
    await until(lambda: disco.applier.desired == ())
    await asyncio.sleep(0.1)
    assert names(server) == {"a"}
    fake.emit("ADDED", pod("e", "10.0.0.5"))
    await until(lambda: names(server) == {"e"})
    assert len(fake.lists) == 1  # all of it over one watch


async def test_file_reload_keeps_discovered_replicas(discovered: Setup) -> None:
    fake, server, disco = await discovered(pods=(pod("a"),))
    await until(lambda: names(server) == {"a"})
    reloader = server.app[RELOADER]
    reloader.source = lambda: parse_config({"health": {"check_interval_s": 3600}, "retry": {"max_attempts": 2}})
    result = await reloader.reload("file")
    assert result.ok, result.error
    assert names(server) == {"a"} and server.app[ROUTER].config.retry.max_attempts == 2


async def test_gone_relists(discovered: Setup) -> None:
    fake, server, disco = await discovered(pods=(pod("a"),))
    await until(lambda: names(server) == {"a"} and bool(fake.watchers))
    fake.gone_next_watch = True
    fake.items["b"] = pod("b", "10.0.0.2")  # happened while the watch was down: only a LIST shows it
    fake.version = 200
    fake.close_watches()  # watch ends -> re-list (after backoff) -> watch -> 410 -> re-list at once
    await until(lambda: len(fake.lists) >= 3 and names(server) == {"a", "b"} and bool(fake.watchers))
    assert fake.watches[-1]["resourceVersion"] == "200"


async def test_errors_back_off_and_recover(discovered: Setup) -> None:
    fake, server, disco = await discovered(pods=(pod("a"),))
    await until(lambda: names(server) == {"a"} and bool(fake.watchers))
    calls = len(fake.lists)
    fake.fail_status = 500
    fake.close_watches()
    await until(lambda: fake.failures >= 3)  # keeps retrying, backing off (bounded at 0.1 s here)
    assert names(server) == {"a"}  # an unreachable API never empties the router
    fake.items["b"] = pod("b", "10.0.0.2")
    fake.fail_status = None
    await until(lambda: len(fake.lists) > calls and names(server) == {"a", "b"} and bool(fake.watchers))


async def test_endpointslices(discovered: Setup) -> None:
    eps = {"metadata": {"name": "vllm-abc"}, "ports": [{"name": "http", "port": 8000}],
           "endpoints": [
               {"addresses": ["10.0.1.1"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "p1"}},
               {"addresses": ["10.0.1.2"], "conditions": {"ready": False}, "targetRef": {"kind": "Pod", "name": "p2"}},
               {"addresses": ["10.0.1.3"], "conditions": {}}]}
    fake, server, _ = await discovered(resource="endpointslices", pods=(eps,), port=None, port_name="http")
    await until(lambda: names(server) == {"p1", "vllm-abc-10.0.1.3"})
    assert server.app[ROUTER].registry.get("p1").url == "http://10.0.1.1:8000"
    await until(lambda: bool(fake.watchers))
    eps = json.loads(json.dumps(eps))
    eps["endpoints"][1]["conditions"]["ready"] = True
    fake.emit("MODIFIED", eps)
    await until(lambda: names(server) == {"p1", "p2", "vllm-abc-10.0.1.3"})


async def test_router_routes_to_discovered_sim(aiohttp_server: Any, sim_server: SimServerFactory,
                                               tmp_path: Path) -> None:
    engine = await sim_server()
    assert engine.port is not None
    fake = FakeKube("PodList")
    fake.items["engine-0"] = pod("engine-0", "127.0.0.1", port=engine.port)
    kube = await aiohttp_server(fake.app())
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": str(kube.make_url("")).rstrip("/")}}],
        "users": [{"name": "router", "user": {"token": "sa-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "router"}}]}))
    cfg = parse_config({"discovery": {"kind": "kubernetes", "namespace": NS, "label_selector": SELECTOR,
                                      "port_name": "http", "kubeconfig": str(kubeconfig),
                                      "debounce_s": 0.01}})
    router = TestServer(create_app(cfg), host="127.0.0.1", handler_cancellation=True)
    await router.start_server()
    try:
        await until(lambda: names(router) == {"engine-0"})
        assert "Bearer sa-token" in fake.auth
        async with aiohttp.ClientSession() as session:
            resp = await session.post(router.make_url("/v1/completions"),
                                      json={"model": "sim-model", "prompt": "hello", "max_tokens": 4})
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-router-replica"] == "engine-0"
    finally:
        fake.close_watches()
        await router.close()


@pytest.mark.parametrize(("discovery", "field"), [
    ({"kind": "kubernetes", "port": 8000}, "label_selector"),
    ({"kind": "kubernetes", "label_selector": "app=x"}, "port"),
    ({"kind": "kubernetes", "label_selector": "app=x", "port": 0}, "discovery.port"),
    ({"kind": "kubernetes", "label_selector": "app=x", "port": 1, "resource": "services"},
     "discovery.resource"),
    ({"kind": "consul"}, "discovery.kind"),
])
def test_config_errors_name_the_field(discovery: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        parse_config({"discovery": discovery})
    assert "discovery" in str(info.value)


def test_kubernetes_discovery_refuses_static_replicas() -> None:
    with pytest.raises(ConfigError, match="replicas"):
        parse_config({"discovery": {"kind": "kubernetes", "label_selector": "a=b", "port": 1},
                      "replicas": [{"name": "a", "url": "http://127.0.0.1:1"}]})
