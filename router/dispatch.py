"""One request through the router: features -> policy decision -> upstream -> outcome -> feedback.

This is the only place that ties the stages together, and it stays small on purpose: the policy knows no
HTTP, the proxy knows no policy, the replica registry knows neither. Retries happen only before the
client has seen a byte, each on a replica not tried yet, and only while the fleet-wide retry budget
(`router.proxy.retry_budget`) allows. Every attempt that took a lease reports exactly one outcome to the
policy and the metrics, also when the client leaves before the response headers (the handler is then
cancelled mid-await). Engines get the client's request id plus a random suffix, unique per request
(tenants' ids may collide); the client gets its own id back, once. With tracing on (`router.tracing`),
each request gets a server span with route and upstream children; with it off, none of that runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from openai_http import REQUEST_ID_HEADER
from router.calibration import NAMES as CONSTANTS
from router.errors import error_response
from router.features.parse import RequestFeatures
from router.metrics import RouterMetrics
from router.policies.base import Decision, Outcome, Policy
from router.proxy.http1 import ClientError, Response, UpstreamPool
from router.proxy.payload import upstream_payload
from router.proxy.relay import EventStreamResponse, RelayResult, cached_tokens, relay_sse, usage_from_json
from router.proxy.retry_budget import RetryBudget
from router.proxy.upstream import Timeouts, UpstreamFailure, forward_headers, open_upstream
from router.replicas.state import Lease, ReplicaRegistry, ReplicaState
from router.routing import Route, RoutingCore, failure
from router.tracing import Tracing

log = logging.getLogger("router.dispatch")

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
    def __init__(self, registry: ReplicaRegistry, policy: Policy, pool: UpstreamPool,
                 metrics: RouterMetrics, settings: DispatchSettings, tracing: Tracing | None = None) -> None:
        self.registry = registry
        self.policy = policy
        self.core = RoutingCore(policy, settings.stale_after_s, self._observe_decision)
        self.pool = pool
        self.metrics = metrics
        self.settings = settings
        self.budget = RetryBudget(settings.budget_ratio, settings.budget_min_retries, settings.budget_window_s)
        self._unreported: set[Lease] = set()  # leases whose attempt has not reported its outcome yet
        self.tracing = tracing
        self._spans: dict[Lease, tuple[Any, bool]] = {}  # attempt in flight -> (upstream span, streamed)
        metrics.before_render = self.export_calibration  # at scrape time, not per request

    def model_label(self, model: str) -> str:
        """`model` as a metric label: only names a replica serves, so clients cannot mint series."""
        # lone surrogates are not printable
        if len(model) <= 256 and model.isprintable() and self.registry.any_serves(model):
            return model
        return UNKNOWN_MODEL

    def choose(self, features: RequestFeatures, candidates: list[ReplicaState]) -> tuple[Decision, ReplicaState]:
        route = self.core.choose(features, candidates, now=time.monotonic())
        return route.decision, route.replica

    def _observe_decision(self, decision: Decision, seconds: float) -> None:
        self.metrics.decision.labels(self.policy.name).observe(seconds)
        self.metrics.decisions.labels(self.policy.name, decision.reason).inc()

    async def handle(self, request: web.Request, path: str, body: dict[str, Any],
                     features: RequestFeatures, raw: bytes | None = None) -> web.StreamResponse:
        """Route, send and relay one request. ``body`` is the client's JSON object and ``raw`` its bytes,
        when known: forwarded as they are unless the router has to change them (a generation stream
        gets the usage request). A passthrough request (``features.kind == "other"``): ``raw`` is sent
        unchanged, and the answer's token usage is not the policy's to learn from (it is no generation)."""
        tracing = self.tracing
        if tracing is None:
            return await self._handle(request, path, body, features, raw, None)
        span = tracing.start_server_span(f"{request.method} {path}", request.headers, {
            "http.request.method": request.method, "url.path": path, "router.request_id": features.request_id,
            "router.model": features.model, "router.stream": bool(body.get("stream"))})
        try:
            with tracing.use(span):  # current: log records carry its ids
                resp = await self._handle(request, path, body, features, raw, span)
            span.set_attribute("http.response.status_code", resp.status)
            if resp.status >= 500:
                tracing.error(span, f"status {resp.status}")
            return resp
        except BaseException as exc:
            tracing.error(span, exc.__class__.__name__)
            raise
        finally:
            span.end()

    async def _handle(self, request: web.Request, path: str, body: dict[str, Any],
                      features: RequestFeatures, raw: bytes | None, span: Any) -> web.StreamResponse:
        started = time.monotonic()
        stream = bool(body.get("stream"))
        if features.kind == "other" and raw is not None:  # passthrough: the client's bytes as they came
            payload, strip_usage = raw, False
        else:  # usage is asked for so cached_tokens feeds the policy; the extra usage event is not forwarded
            payload, strip_usage = upstream_payload(body, raw, stream)
        upstream_rid = f"{features.request_id}-{os.urandom(6).hex()}"  # still greppable, never shared
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
            if span is not None:
                self._trace_route(span, decision, candidates)
            tried.add(replica.name)
            if attempt:
                self.metrics.retries.labels(last_failure.kind if last_failure else "unknown").inc()
            try:
                return await self._attempt(request, path, payload, headers, features, decision, replica,
                                           stream, strip_usage, started, span, attempt)
            except UpstreamFailure as failure:
                last_failure = failure
                log.warning("rid=%s replica=%s attempt=%d failed: %s", features.request_id, replica.name,
                            attempt + 1, failure)
                if not failure.retryable:
                    break
        return self._give_up(features, tried, last_failure)

    def _trace_route(self, parent: Any, decision: Decision, candidates: list[ReplicaState]) -> None:
        assert self.tracing is not None
        names = [r.name for r in candidates]
        attrs: dict[str, Any] = {"router.policy": self.policy.name, "router.replica": decision.replica,
                                 "router.reason": decision.reason, "router.matched_blocks": decision.matched_blocks,
                                 "router.candidates": names}
        if decision.scores:
            attrs["router.candidate_costs"] = [float(decision.scores.get(n, float("nan"))) for n in names]
        self.tracing.start_child(parent, "route", attrs).end()

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
                       strip_usage: bool, started: float, parent: Any = None, attempt: int = 0
                       ) -> web.StreamResponse:
        # (the in-flight gauge is read from the replicas when the metrics are scraped, not set per request)
        with self.core.dispatch(Route(decision, replica), features) as lease:
            self._unreported.add(lease)
            if parent is not None and self.tracing is not None:
                span = self.tracing.start_child(parent, "upstream", {
                    "router.replica": replica.name, "router.attempt": attempt + 1, "router.retry": attempt > 0,
                    "server.address": replica.url}, client=True)
                self._spans[lease] = (span, stream)
                headers = dict(headers)
                self.tracing.inject(span, headers)  # W3C traceparent to the engine
            try:
                return await self._exchange(request, path, payload, headers, features, decision, lease,
                                            stream, strip_usage, started)
            except BaseException as exc:
                if lease in self._unreported:  # cancelled (the client left) or a bug: report it anyway
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    if cancelled:
                        self.metrics.client_disconnects.inc()
                    self._finish(features, decision, lease, failure(
                        499 if cancelled else 500, "client_disconnect" if cancelled else "router_error"),
                        health_failure=False)
                raise
            finally:
                self._unreported.discard(lease)
                if self._spans:
                    traced = self._spans.pop(lease, None)
                    if traced is not None:
                        traced[0].end()

    async def _exchange(self, request: web.Request, path: str, payload: bytes, headers: dict[str, str],
                        features: RequestFeatures, decision: Decision, lease: Lease, stream: bool,
                        strip_usage: bool, started: float) -> web.StreamResponse:
        s, replica = self.settings, lease.replica
        try:
            upstream = await open_upstream(self.pool, replica.url + path, payload, headers, s.timeouts,
                                           s.retry_statuses, stream=stream)
        except UpstreamFailure as exc:
            self._finish(features, decision, lease, failure(exc.status or 0, exc.kind),
                         health_failure=exc.health_failure)
            raise
        if stream:
            lease.first_token()  # engine servers send headers with the first token: prefill is done
        try:
            if stream and upstream.status == 200:
                return await self._relay_stream(request, upstream, features, decision, lease,
                                                strip_usage, started)
            return await self._relay_unary(upstream, features, decision, lease, started)
        finally:
            upstream.close()  # reused after a full read; else closed, which tells the engine at once

    def _response_headers(self, upstream: Response, replica: ReplicaState,
                          features: RequestFeatures) -> dict[str, str]:
        headers = forward_headers(upstream)
        headers[REQUEST_ID_HEADER] = features.request_id
        if self.settings.replica_header:
            headers[self.settings.replica_header] = replica.name
        return headers

    async def _relay_unary(self, upstream: Response, features: RequestFeatures,
                           decision: Decision, lease: Lease, started: float) -> web.Response:
        replica = lease.replica
        try:
            async with asyncio.timeout(max(0.0, started + self.settings.timeouts.total_s - time.monotonic())):
                data = await upstream.read()
        except (TimeoutError, ClientError, ConnectionError) as exc:
            broken = UpstreamFailure("deadline" if isinstance(exc, TimeoutError) else "protocol",
                                     f"reading the response failed: {exc.__class__.__name__}")
            self._finish(features, decision, lease, failure(0, broken.kind), health_failure=broken.health_failure)
            raise broken from exc
        usage = usage_from_json(data) if upstream.status == 200 and features.kind != "other" else None
        elapsed = time.monotonic() - started
        model = self.model_label(features.model)
        self._finish(features, decision, lease, _outcome(upstream.status, elapsed, usage, elapsed),
                     health_failure=False, model=model)
        self.metrics.e2e.labels(model).observe(elapsed)
        return web.Response(status=upstream.status, body=data,
                            headers=self._response_headers(upstream, replica, features))

    async def _relay_stream(self, request: web.Request, upstream: Response,
                            features: RequestFeatures, decision: Decision, lease: Lease,
                            strip_usage: bool, started: float) -> web.StreamResponse:
        replica = lease.replica
        resp = EventStreamResponse(status=200, headers=self._response_headers(upstream, replica, features))
        result = RelayResult()
        try:
            await resp.prepare(request)
            await relay_sse(upstream, resp, self.settings.timeouts.idle_s, strip_usage, result)
        except (ConnectionError, asyncio.CancelledError) as exc:  # ConnectionResetError included
            # The client left: closing the upstream (in the caller's finally) aborts the engine request.
            if result.done:  # after [DONE], as OpenAI's SDKs do: it had its whole answer, a success
                self._stream_outcome(features, decision, lease, result, started)
            else:  # once its first bytes were sent the prompt was prefilled: its blocks are cached
                self._client_left(features, replica)
                ttft = result.first_byte_at - started if result.first_byte_at is not None else None
                self._finish(features, decision, lease, failure(499, "client_disconnect", ttft),
                             health_failure=False)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return resp
        # The replica is done: its outcome is recorded (in-flight released, policy fed) before the client
        # hears the end, so a client's next request, often sent the moment this one ends, is routed on
        # the fleet as it is and does not wait behind this one's bookkeeping.
        try:
            self._stream_outcome(features, decision, lease, result, started)
        finally:  # the client gets the end of its answer even if recording went wrong (logged above us)
            try:
                await resp.write_eof(result.tail)
            except ConnectionError:  # left at the very end: the answer was complete, its outcome stands
                self._client_left(features, replica)
        return resp

    def _client_left(self, features: RequestFeatures, replica: ReplicaState) -> None:
        self.metrics.client_disconnects.inc()
        log.info("rid=%s client disconnected from stream (replica %s)", features.request_id, replica.name)

    def _stream_outcome(self, features: RequestFeatures, decision: Decision, lease: Lease, result: RelayResult,
                        started: float) -> None:
        elapsed = time.monotonic() - started
        ttft = result.first_byte_at - started if result.first_byte_at is not None else None
        if self._spans and result.first_byte_at is not None and (traced := self._spans.get(lease)) is not None:
            span = traced[0]
            ago_ns = int((time.monotonic() - result.first_byte_at) * 1e9)
            span.add_event("first_token", {"router.ttft_s": ttft or 0.0}, timestamp=time.time_ns() - ago_ns)
        model = self.model_label(features.model)  # once: three series below carry it
        if ttft is not None:
            self.metrics.ttft.labels(model).observe(ttft)
        self.metrics.e2e.labels(model).observe(elapsed)
        if result.error is not None:
            self._finish(features, decision, lease, failure(502, "mid_stream", ttft), health_failure=True,
                         model=model)
        else:
            outcome = _outcome(200, ttft, result.usage if features.kind != "other" else None, elapsed)
            self._finish(features, decision, lease, outcome, health_failure=False, model=model)

    def _finish(self, features: RequestFeatures, decision: Decision, lease: Lease, outcome: Outcome,
                *, health_failure: bool, model: str | None = None) -> None:
        """Report the attempt's one outcome (``model``: its metric label, if the caller has it)."""
        self._unreported.discard(lease)
        if self._spans and (traced := self._spans.get(lease)) is not None:
            self._trace_outcome(*traced, outcome)
        replica = lease.replica
        self.core.complete(Route(decision, replica), lease, features, outcome, health_failure=health_failure)
        if model is None:
            model = self.model_label(features.model)
        self.metrics.requests.labels(model, replica.name, str(outcome.status)).inc()
        if outcome.prompt_tokens:
            self.metrics.prompt_tokens.labels(replica.name).inc(outcome.prompt_tokens)
        if outcome.cached_tokens:
            self.metrics.cached_tokens.labels(replica.name).inc(outcome.cached_tokens)

    def _trace_outcome(self, span: Any, stream: bool, outcome: Outcome) -> None:
        assert self.tracing is not None
        attrs: dict[str, Any] = {"router.outcome": "ok" if outcome.ok else (outcome.error_kind or "error")}
        for key, value in (("router.prompt_tokens", outcome.prompt_tokens),
                           ("router.cached_tokens", outcome.cached_tokens),
                           ("router.completion_tokens", outcome.completion_tokens)):
            if value is not None:
                attrs[key] = value
        if outcome.status:
            span.set_attribute("http.response.status_code", outcome.status)
        span.set_attributes(attrs)
        span.add_event("stream_end" if stream else "response_end", attrs)
        if not outcome.ok:
            self.tracing.error(span, attrs["router.outcome"])

    def export_calibration(self) -> None:
        """Mirror the policy's learned timing of every replica (if it learns any) into the metrics.
        Called when the metrics are scraped: a snapshot refits the constants, too dear per request."""
        hook = getattr(self.policy, "calibration", None)
        if not callable(hook):
            return
        for name in self.registry.names():
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
