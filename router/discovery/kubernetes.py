"""Kubernetes discovery: LIST then WATCH pods or EndpointSlices matching a label selector.

A pod is a replica while it is Running, Ready, has a podIP and is not terminating; an EndpointSlice
endpoint while its ``ready`` condition is not false (unset counts as ready, as the API says) and it is not
terminating. Replica name = pod name (the endpoint's targetRef, else ``<slice>-<address>``), url =
``scheme://ip:port``. ``port`` is used as is; ``port_name`` is looked up in the pod's container ports or
the slice's ports.

The loop: LIST (full state, resourceVersion) -> WATCH from that version, applying ADDED / MODIFIED /
DELETED (BOOKMARK only moves the version) -> on 410 Gone re-LIST at once; on watch end or any error
re-LIST after a backoff (doubling, bounded). Every change hands the full set to the `ReplicaSetApplier`.
HTTP goes through kubernetes-asyncio's ApiClient (auth, TLS, in-cluster or kubeconfig config); the
watch stream is read line by line here, so a 410 is handled by re-listing instead of re-watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from config.router import DiscoveryConfig, ReplicaConfig
from router.discovery.applier import ReplicaSetApplier

log = logging.getLogger("router.discovery.kubernetes")

Obj = dict[str, Any]


class Gone(Exception):
    """The watched resourceVersion is too old (HTTP 410 or an ERROR event with code 410)."""


def _pod_port(pod: Obj, cfg: DiscoveryConfig) -> int | None:
    if cfg.port is not None:
        return cfg.port
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == cfg.port_name:
                return port.get("containerPort")
    return None


def pod_replica(pod: Obj, cfg: DiscoveryConfig) -> ReplicaConfig | None:
    """The replica a pod stands for, or None while it cannot serve."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    port = _pod_port(pod, cfg)
    if not ready or port is None or not meta.get("name"):
        return None
    return ReplicaConfig(name=meta["name"], url=f"{cfg.scheme}://{_host(status['podIP'])}:{port}",
                         models=cfg.models)


def slice_replicas(eps: Obj, cfg: DiscoveryConfig) -> list[ReplicaConfig]:
    """The ready endpoints of one EndpointSlice, as replicas."""
    port = cfg.port
    if port is None:
        port = next((p.get("port") for p in eps.get("ports") or [] if p.get("name") == cfg.port_name), None)
    if port is None:
        return []
    slice_name = (eps.get("metadata") or {}).get("name", "slice")
    out = []
    for ep in eps.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        addresses = ep.get("addresses") or []
        if cond.get("ready") is False or cond.get("terminating") is True or not addresses:
            continue
        ref = ep.get("targetRef") or {}
        name = ref.get("name") if ref.get("kind", "Pod") == "Pod" and ref.get("name") else None
        name = name or f"{slice_name}-{addresses[0]}"
        out.append(ReplicaConfig(name=name, url=f"{cfg.scheme}://{_host(addresses[0])}:{port}",
                                 models=cfg.models))
    return out


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


async def api_client_for(cfg: DiscoveryConfig) -> client.ApiClient:
    """An ApiClient from ``cfg.kubeconfig``, else from the in-cluster service account."""
    conf = client.Configuration()
    if cfg.kubeconfig is not None:
        await config.load_kube_config(config_file=str(cfg.kubeconfig), client_configuration=conf)
    else:
        config.load_incluster_config(client_configuration=conf)
    return client.ApiClient(configuration=conf)


class KubernetesDiscovery:
    """Keeps the router's replicas equal to the matching ready pods / endpoints (see module docstring).

    configuration: an explicit client Configuration (tests point its host at a fake API server);
        default: `api_client_for(cfg)` when started.
    """

    def __init__(self, cfg: DiscoveryConfig, applier: ReplicaSetApplier, *,
                 configuration: client.Configuration | None = None, watch_timeout_s: int = 300,
                 min_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        if cfg.kind != "kubernetes" or cfg.label_selector is None:
            raise ValueError("discovery: kind kubernetes with a label_selector is required")
        self.cfg = cfg
        self.applier = applier
        self.configuration = configuration
        self.watch_timeout_s = watch_timeout_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.lists = 0  # LIST calls made; for tests and logs
        self._objects: dict[str, list[ReplicaConfig]] = {}  # pod or slice name -> its replicas
        self._api: client.ApiClient | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def _path(self) -> str:
        ns = self.cfg.namespace
        if self.cfg.resource == "pods":
            return f"/api/v1/namespaces/{ns}/pods"
        return f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"

    async def start(self) -> None:
        self._api = (client.ApiClient(configuration=self.configuration) if self.configuration is not None
                     else await api_client_for(self.cfg))
        self.applier.start()
        self._task = asyncio.create_task(self._run(), name="discovery-kubernetes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.applier.stop()
        if self._api is not None:
            await self._api.close()
            self._api = None

    def replicas(self) -> list[ReplicaConfig]:
        """The current wanted set: every ready replica of every known object (first name wins)."""
        seen: dict[str, ReplicaConfig] = {}
        for reps in self._objects.values():
            for r in reps:
                seen.setdefault(r.name, r)
        return list(seen.values())

    def _replicas_of(self, obj: Obj) -> list[ReplicaConfig]:
        if self.cfg.resource == "pods":
            rep = pod_replica(obj, self.cfg)
            return [rep] if rep is not None else []
        return slice_replicas(obj, self.cfg)

    async def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            try:
                version = await self._list()
                await self._watch(version)
                log.debug("watch of %s ended; re-listing", self._path)
            except Gone:
                log.info("watch of %s: resourceVersion gone (410); re-listing", self._path)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kubernetes discovery (%s): %s: %s; retrying in %.1fs", self._path,
                            exc.__class__.__name__, exc, backoff)
            else:
                backoff = self.min_backoff_s  # a watch that ran to its end: the API is fine
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _get(self, params: dict[str, str], timeout: aiohttp.ClientTimeout) -> Any:
        assert self._api is not None
        query = [("labelSelector", self.cfg.label_selector), *params.items()]
        resp = await self._api.call_api(
            self._path, "GET", query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
            _request_timeout=timeout)
        if resp.status == 410:
            resp.release()
            raise Gone()
        if not 200 <= resp.status < 300:
            body = (await resp.text())[:300]
            resp.release()
            raise RuntimeError(f"GET {self._path} answered {resp.status}: {body}")
        return resp

    async def _list(self) -> str:
        resp = await self._get({}, aiohttp.ClientTimeout(total=30))
        try:
            data = json.loads(await resp.read())
        finally:
            resp.release()
        self.lists += 1
        self._objects = {}
        for obj in data.get("items") or []:
            name = (obj.get("metadata") or {}).get("name")
            if name:
                self._objects[name] = self._replicas_of(obj)
        self.applier.submit(self.replicas())
        log.info("listed %s (%s): %d ready replicas", self._path, self.cfg.label_selector,
                 len(self.replicas()))
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, version: str) -> None:
        params = {"watch": "true", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.watch_timeout_s)}
        if version:
            params["resourceVersion"] = version
        timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=self.watch_timeout_s + 30)
        resp = await self._get(params, timeout)
        try:
            while line := await resp.content.readline():
                if line.strip():
                    self._on_event(json.loads(line))
        finally:
            resp.release()

    def _on_event(self, event: Obj) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        name = (obj.get("metadata") or {}).get("name")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not name:
            return  # BOOKMARK, or something unknown
        before = self.replicas()
        if kind == "DELETED":
            self._objects.pop(name, None)
        else:
            self._objects[name] = self._replicas_of(obj)
        after = self.replicas()
        if after != before:
            self.applier.submit(after)
