"""Prometheus metrics with vLLM's own names, so existing vLLM dashboards work against either backend.

One registry per server instance (no module-level globals): tests can run many servers in one process.
Counters and histograms are fed by the HTTP layer from the backend's deltas, which keeps both backends'
metrics identical by construction; the gauges are read from the backend's load report at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine_server.backend import LoadReport

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)

METRIC_NAMES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_success_total",
)


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", labels,
                             registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100 percent", labels,
                              registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels,
                                   registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=E2E_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason",
                               labels + ["finished_reason"], registry=r)

    def observe_first_token(self, prompt_tokens: int, cached_tokens: int, ttft_s: float) -> None:
        m = self.model_name
        self.prefix_queries.labels(m).inc(prompt_tokens)
        self.prefix_hits.labels(m).inc(cached_tokens)
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.ttft.labels(m).observe(ttft_s)

    def observe_finished(self, completion_tokens: int, finish_reason: str, e2e_s: float) -> None:
        m = self.model_name
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.e2e.labels(m).observe(e2e_s)
        self.success.labels(m, finish_reason).inc()

    def render(self, report: LoadReport) -> bytes:
        m = self.model_name
        self.running.labels(m).set(report.running)
        self.waiting.labels(m).set(report.waiting)
        total = report.kv_blocks_total
        self.kv_usage.labels(m).set(report.kv_blocks_used / total if total else 0.0)
        return generate_latest(self.registry)
