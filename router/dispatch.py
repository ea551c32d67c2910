"""One request through the router: features -> policy decision -> upstream -> outcome -> feedback.

This is the only place that ties the stages together, and it stays small on purpose: the policy knows no
HTTP, the proxy knows no policy, the replica registry knows neither. Retries happen only before the
client has seen a byte, each on a replica not tried yet, and only while the fleet-wide retry budget
(`router.proxy.retry_budget`) allows. Every attempt that took a lease reports exactly one outcome to the
policy and the metrics, also when the client leaves before the response headers (the handler is then
cancelled mid-await). Engines get the client's request id plus a random suffix, unique per request
(tenants' ids may collide); the client gets its own id back, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from router.calibration import NAMES as CONSTANTS
from router.errors import error_response
from router.features.parse import RequestFeatures
from router.metrics import RouterMetrics
from router.policies.base import Decision, Outcome, Policy
from router.proxy.relay import RelayResult, cached_tokens, relay_sse, usage_from_json
from router.proxy.retry_budget import RetryBudget
from router.proxy.upstream import Timeouts, UpstreamFailure, forward_headers, open_upstream
from router.replicas.state import Lease, ReplicaRegistry, ReplicaState

log = logging.getLogger("router.dispatch")

REQUEST_ID_HEADER = "X-Request-Id"
UNKNOWN_MODEL = "unknown"  # metric label for model names no replica serves (labels stay bounded)


@dataclass
class DispatchSettings:
    timeouts: Timeouts
    max_attempts: int
    retry_statuses: frozenset[int]
    stale_after_s: float
    replica_header: str | None
    budget_ratio: float = 0.2
    budget_min_retries: int = 10
    budget_window_s: float = 10.0


class Dispatcher:
    def __init__(self, registry: ReplicaRegistry, policy: Policy, session: aiohttp.ClientSession,
                 metrics: RouterMetrics, settings: DispatchSettings) -> None:
        self.registry = registry
        self.policy = policy
        self.session = session
        self.metrics = metrics
        self.settings = settings
        self.budget = RetryBudget(settings.budget_ratio, settings.budget_min_retries, settings.budget_window_s)
        self._unreported: set[Lease] = set()  # leases whose attempt has not reported its outcome yet

    def model_label(self, model: str) -> str:
        """`model` as a metric label: only names a replica serves, so clients cannot mint series."""
        if len(model) <= 256 and model.isprintable():  # lone surrogates are not printable
            for r in self.registry.all():
                if model in r.served_models:
                    return model
        return UNKNOWN_MODEL

    def choose(self, features: RequestFeatures, candidates: list[ReplicaState]) -> tuple[Decision, ReplicaState]:
        now = time.monotonic()
        views = [r.view(now, self.settings.stale_after_s) for r in candidates]
        t0 = time.perf_counter()
        decision = self.policy.choose(features, views)
        self.metrics.decision.labels(self.policy.name).observe(time.perf_counter() - t0)
        self.metrics.decisions.labels(self.policy.name, decision.reason).inc()
        chosen = next((r for r in candidates if r.name == decision.replica), None)
        if chosen is None:  # a policy bug must not take the request down: fall back to the first candidate
            log.error("policy %s chose unknown replica %r", self.policy.name, decision.replica)
            chosen = candidates[0]
            decision = Decision(replica=chosen.name, reason="fallback")
        return decision, chosen

    async def handle(self, request: web.Request, path: str, body: dict[str, Any],
                     features: RequestFeatures) -> web.StreamResponse:
        started = time.monotonic()
        stream = bool(body.get("stream"))
        strip_usage = False
        if stream:
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                # Ask for usage so cached_tokens feeds the policy; the extra event is not forwarded.
                body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}),
                                                   "include_usage": True}}
                strip_usage = True
        payload = json.dumps(body, separators=(",", ":")).encode()
        upstream_rid = f"{features.request_id}-{uuid.uuid4().hex[:12]}"  # still greppable, never shared
        headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: upstream_rid}
        if stream:
            headers["Accept"] = "text/event-stream"
        tried: set[str] = set()
        last_failure: UpstreamFailure | None = None
        self.budget.on_request()
        for attempt in range(self.settings.max_attempts):
            candidates = [r for r in self.registry.eligible(features.model, time.monotonic())
                          if r.name not in tried]
            if not candidates:
                break
            if attempt and not self.budget.try_retry():
                self.metrics.retries_denied.inc()
                break
            decision, replica = self.choose(features, candidates)
            tried.add(replica.name)
            if attempt:
                self.metrics.retries.labels(last_failure.kind if last_failure else "unknown").inc()
            try:
                return await self._attempt(request, path, payload, headers, features, decision, replica,
                                           stream, strip_usage, started)
            except UpstreamFailure as failure:
                last_failure = failure
                log.warning("rid=%s replica=%s attempt=%d failed: %s", features.request_id, replica.name,
                            attempt + 1, failure)
                if not failure.retryable:
                    break
        return self._give_up(features, tried, last_failure)

    def _give_up(self, features: RequestFeatures, tried: set[str],
                 failure: UpstreamFailure | None) -> web.Response:
        model = self.model_label(features.model)
        if failure is None:
            self.metrics.requests.labels(model, "none", "503").inc()
            return error_response(f"no healthy replica serves model {features.model!r}", 503)
        if failure.kind == "status" and failure.status is not None:
            self.metrics.requests.labels(model, "none", str(failure.status)).inc()
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
            return web.Response(status=failure.status, body=failure.body, content_type="application/json",
                                headers=headers)
        status = 504 if failure.kind in ("timeout", "deadline") else 502
        self.metrics.requests.labels(model, "none", str(status)).inc()
        return error_response(f"all {len(tried)} replica attempt(s) failed; last: {failure}", status)

    async def _attempt(self, request: web.Request, path: str, payload: bytes, headers: dict[str, str],
                       features: RequestFeatures, decision: Decision, replica: ReplicaState, stream: bool,
                       strip_usage: bool, started: float) -> web.StreamResponse:
        with replica.lease(features.token_estimate) as lease:
            self.metrics.in_flight.labels(replica.name).set(replica.in_flight_requests)
            self.policy.on_dispatch(features, decision)
            self._unreported.add(lease)
            try:
                return await self._exchange(request, path, payload, headers, features, decision, lease,
                                            stream, strip_usage, started)
            except BaseException as exc:
                if lease in self._unreported:  # cancelled (the client left) or a bug: report it anyway
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    if cancelled:
                        self.metrics.client_disconnects.inc()
                    self._finish(features, decision, lease, Outcome(
                        ok=False, status=499 if cancelled else 500, ttft_s=None, prompt_tokens=None,
                        cached_tokens=None, completion_tokens=None,
                        error_kind="client_disconnect" if cancelled else "router_error"), health_failure=False)
                raise
            finally:
                self._unreported.discard(lease)

    async def _exchange(self, request: web.Request, path: str, payload: bytes, headers: dict[str, str],
                        features: RequestFeatures, decision: Decision, lease: Lease, stream: bool,
                        strip_usage: bool, started: float) -> web.StreamResponse:
        s, replica = self.settings, lease.replica
        try:
            upstream = await open_upstream(self.session, replica.url + path, payload, headers, s.timeouts,
                                           s.retry_statuses, stream=stream)
        except UpstreamFailure as failure:
            self._finish(features, decision, lease, Outcome(
                ok=False, status=failure.status or 0, ttft_s=None, prompt_tokens=None, cached_tokens=None,
                completion_tokens=None, error_kind=failure.kind), health_failure=failure.health_failure)
            raise
        if stream:
            lease.first_token()  # engine servers send headers with the first token: prefill is done
        try:
            if stream and upstream.status == 200:
                return await self._relay_stream(request, upstream, features, decision, lease,
                                                strip_usage, started)
            return await self._relay_unary(upstream, features, decision, lease, started)
        finally:
            upstream.close()  # no-op after a full read; on disconnect/cancel it tells the engine at once
            self.metrics.in_flight.labels(replica.name).set(replica.in_flight_requests - 1)

    def _response_headers(self, upstream: aiohttp.ClientResponse, replica: ReplicaState,
                          features: RequestFeatures) -> dict[str, str]:
        headers = forward_headers(upstream)
        headers[REQUEST_ID_HEADER] = features.request_id
        if self.settings.replica_header:
            headers[self.settings.replica_header] = replica.name
        return headers

    async def _relay_unary(self, upstream: aiohttp.ClientResponse, features: RequestFeatures,
                           decision: Decision, lease: Lease, started: float) -> web.Response:
        replica = lease.replica
        try:
            async with asyncio.timeout(max(0.0, started + self.settings.timeouts.total_s - time.monotonic())):
                data = await upstream.read()
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            failure = UpstreamFailure("deadline" if isinstance(exc, TimeoutError) else "protocol",
                                      f"reading the response failed: {exc.__class__.__name__}")
            self._finish(features, decision, lease, Outcome(
                ok=False, status=0, ttft_s=None, prompt_tokens=None, cached_tokens=None,
                completion_tokens=None, error_kind=failure.kind), health_failure=failure.health_failure)
            raise failure from exc
        usage = usage_from_json(data) if upstream.status == 200 else None
        elapsed = time.monotonic() - started
        self._finish(features, decision, lease, _outcome(upstream.status, elapsed, usage, elapsed),
                     health_failure=False)
        self.metrics.e2e.labels(self.model_label(features.model)).observe(elapsed)
        return web.Response(status=upstream.status, body=data,
                            headers=self._response_headers(upstream, replica, features))

    async def _relay_stream(self, request: web.Request, upstream: aiohttp.ClientResponse,
                            features: RequestFeatures, decision: Decision, lease: Lease,
                            strip_usage: bool, started: float) -> web.StreamResponse:
        replica = lease.replica
        resp = web.StreamResponse(status=200, headers=self._response_headers(upstream, replica, features))
        result = RelayResult()
        try:
            await resp.prepare(request)
            result = await relay_sse(upstream, resp, self.settings.timeouts.idle_s, strip_usage)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:  # ConnectionResetError included
            # The client left: closing the upstream (in the caller's finally) aborts the engine request.
            self.metrics.client_disconnects.inc()
            log.info("rid=%s client disconnected from stream (replica %s)", features.request_id, replica.name)
            self._finish(features, decision, lease, Outcome(
                ok=False, status=499, ttft_s=None, prompt_tokens=None, cached_tokens=None,
                completion_tokens=None, error_kind="client_disconnect"), health_failure=False)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return resp
        elapsed = time.monotonic() - started
        ttft = result.first_byte_at - started if result.first_byte_at is not None else None
        if ttft is not None:
            self.metrics.ttft.labels(self.model_label(features.model)).observe(ttft)
        self.metrics.e2e.labels(self.model_label(features.model)).observe(elapsed)
        if result.error is not None:
            self._finish(features, decision, lease, Outcome(
                ok=False, status=502, ttft_s=ttft, prompt_tokens=None, cached_tokens=None, completion_tokens=None,
                error_kind="mid_stream"), health_failure=True)
        else:
            outcome = _outcome(200, ttft, result.usage, elapsed)
            self._finish(features, decision, lease, outcome, health_failure=False)
        return resp

    def _finish(self, features: RequestFeatures, decision: Decision, lease: Lease, outcome: Outcome,
                *, health_failure: bool) -> None:
        self._unreported.discard(lease)
        replica = lease.replica
        if health_failure:
            lease.record_failure(outcome.error_kind or "error")
        elif outcome.ok:
            lease.record_success()
        replica.record_usage(outcome.prompt_tokens, outcome.cached_tokens)
        status = str(outcome.status)
        self.metrics.requests.labels(self.model_label(features.model), replica.name, status).inc()
        if outcome.prompt_tokens:
            self.metrics.prompt_tokens.labels(replica.name).inc(outcome.prompt_tokens)
        if outcome.cached_tokens:
            self.metrics.cached_tokens.labels(replica.name).inc(outcome.cached_tokens)
        try:
            self.policy.on_complete(features, decision, outcome)
            self._export_calibration(replica.name)
        except Exception:  # feedback must never break the response path
            log.exception("policy %s on_complete failed", self.policy.name)

    def _export_calibration(self, name: str) -> None:
        """Mirror the policy's learned timing of ``name`` (if it learns any) into the metrics."""
        hook = getattr(self.policy, "calibration", None)
        if not callable(hook):
            return
        shown = hook(name)
        for constant in CONSTANTS:
            self.metrics.cost_constant.labels(name, constant).set(shown[constant])
        self.metrics.calibration_observations.labels(name).set(shown["observations"])
        self.metrics.slot_limit.labels(name).set(shown["slot_limit"] or 0)


def _outcome(status: int, ttft_s: float | None, usage: dict[str, Any] | None, e2e_s: float | None = None
             ) -> Outcome:
    prompt = usage.get("prompt_tokens") if usage else None
    completion = usage.get("completion_tokens") if usage else None
    return Outcome(ok=status == 200, status=status, ttft_s=ttft_s,
                   prompt_tokens=prompt if isinstance(prompt, int) else None,
                   cached_tokens=cached_tokens(usage),
                   completion_tokens=completion if isinstance(completion, int) else None,
                   error_kind=None if status == 200 else f"status_{status}", e2e_s=e2e_s)
