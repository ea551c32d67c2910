"""Grafana dashboards for prefix-router, generated with grafana-foundation-sdk (never hand-edited JSON).

Two dashboards, written to deploy/grafana/dashboards/ and loaded by Grafana's file provisioning
(deploy/grafana/provisioning/):

- ``prefix-router.json``: traffic by status and replica, 5xx ratio, TTFT and E2E percentiles, prefix-cache
  hit rate per replica, routing decisions by reason, decision time, retries, ejections, health, rejections,
  config reloads, and the KV events' sync status, index size, lag and gaps (metric names: router/metrics.py,
  router/kv_events/live.py).
- ``vllm-engines.json``: running/waiting requests, KV-cache usage, prefix-cache hit rate, token throughput
  and the engines' own TTFT/E2E (the ``vllm:*`` names vLLM and the sim backend export).

Every panel's queries are listed in ``DASHBOARDS`` as plain PromQL so tests can run each one against a real
Prometheus (``$__rate_interval`` is Grafana's; tests substitute a duration).

    python deploy/grafana/generate_dashboards.py            # rewrite the JSON files
    python deploy/grafana/generate_dashboards.py --check    # exit 1 if the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(Query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
                       f"p{int(q * 100)}{suffix}") for q in (0.5, 0.9, 0.99))


def _ratio(num: str, den: str, by: str = "") -> str:
    group = f"sum by ({by}) " if by else "sum "
    return f"{group}(rate({num}[{RATE}])) / {group}(rate({den}[{RATE}]))"


ROUTER_ROWS = (
    Row("Traffic", (
        Panel("Requests by status", "Attempts per second by HTTP status: a retried request counts once per "
              "replica tried, a give-up once more (replica 'none').", "reqps",
              (Query(f"sum by (status) (rate(router_requests_total[{RATE}]))", "{{status}}"),)),
        Panel("Requests by replica", "Where the router sent attempts ('none': no replica left, or all failed).",
              "reqps", (Query(f"sum by (replica) (rate(router_requests_total[{RATE}]))", "{{replica}}"),)),
        Panel("5xx ratio", "Share of attempts and give-ups ending 5xx; clients see fewer when a retry "
              "succeeds (alert PrefixRouterErrorRate above 5 %).",
              "percentunit",
              (Query(f'sum(rate(router_requests_total{{status=~"5.."}}[{RATE}])) '
                     f"/ sum(rate(router_requests_total[{RATE}]))", "5xx"),)),
        Panel("In flight per replica", "Requests the router has in flight on each replica.", "short",
              (Query("sum by (replica) (router_replica_in_flight)", "{{replica}}"),)),
    )),
    Row("Latency", (
        Panel("Time to first token", "TTFT percentiles as clients see them through the router.", "s",
              _quantiles("router_time_to_first_token_seconds")),
        Panel("End-to-end latency", "Whole-request latency percentiles.", "s",
              _quantiles("router_request_duration_seconds")),
    )),
    Row("Prefix cache", (
        Panel("Hit rate per replica", "Prompt tokens the engine served from its prefix cache, per replica "
              "(engine-reported cached_tokens / prompt_tokens of the requests routed there).", "percentunit",
              (Query(_ratio("router_cached_tokens_total", "router_prompt_tokens_total", "replica"),
                     "{{replica}}"),)),
        Panel("Cluster hit rate", "Fleet-wide prefix-cache hit rate (alert PrefixRouterCacheHitRateDropped).",
              "percentunit",
              (Query(_ratio("router_cached_tokens_total", "router_prompt_tokens_total"), "hit rate"),)),
    )),
    Row("Routing", (
        Panel("Decisions by reason", "Why the policy chose a replica (reason labels: docs/policies.md).",
              "ops", (Query(f"sum by (policy, reason) (rate(router_decisions_total[{RATE}]))",
                            "{{policy}} {{reason}}"),)),
        Panel("Decision time", "Time the policy took to choose (p50/p90/p99).", "s",
              _quantiles("router_decision_seconds")),
        Panel("Retries by reason", "Attempts moved to another replica before the first byte.", "ops",
              (Query(f"sum by (reason) (rate(router_retries_total[{RATE}]))", "{{reason}}"),)),
        Panel("Ejections", "Replicas ejected by health tracking (alert PrefixRouterEjectionsFlapping).",
              "short", (Query(f"sum by (replica) (increase(router_replica_ejections_total[{RATE}]))",
                              "{{replica}}"),)),
        Panel("Replica admitted", "1 while a replica is admitted for traffic, per router instance.", "short",
              (Query("router_replica_healthy", "{{replica}} via {{instance}}"),)),
        Panel("Rejected before routing", "Requests refused for auth, limits or overload.", "reqps",
              (Query(f"sum by (reason) (rate(router_rejected_requests_total[{RATE}]))", "{{reason}}"),)),
        Panel("Config reloads", "Config changes by result, and the running generation.", "short",
              (Query(f"sum by (result) (increase(router_config_reloads_total[{RATE}]))", "{{result}}"),
               Query("max by (instance) (router_config_generation)", "generation {{instance}}"))),
    )),
    Row("KV events", (  # with kv_events enabled (docs/kv_events.md); no series otherwise
        Panel("Replicas synced", "Replicas whose exact index follows the engine's KV events (synced), per "
              "router instance; the others are routed on the approximate index (alert "
              "PrefixRouterKVEventsNotSynced).", "short",
              (Query('sum by (instance, status) (router_kv_events_status)', "{{status}} via {{instance}}"),)),
        Panel("Exact index blocks", "KV blocks each replica's exact index holds (its engine's prefix cache).",
              "short", (Query("max by (replica) (router_kv_events_blocks)", "{{replica}}"),)),
        Panel("Event lag", "Event batches a replica published that the router has not applied yet.", "short",
              (Query("max by (replica) (router_kv_events_lag_batches)", "{{replica}}"),)),
        Panel("Gaps, replays, losses", "Sequence gaps detected, replays asked for, and batches lost beyond the "
              "engine's replay buffer (the index is then partial until resynced).", "short",
              tuple(Query(f"sum by (replica) (increase(router_kv_events_{k}_total[{RATE}]))", f"{k} {{{{replica}}}}")
                    for k in ("gaps", "replays", "lost"))),
    )),
)

ENGINE_ROWS = (
    Row("Queues", (
        Panel("Running requests", "Requests in each engine's running batch.", "short",
              (Query("sum by (instance) (vllm:num_requests_running)", "{{instance}}"),)),
        Panel("Waiting requests", "Requests queued in each engine (the HPA's metric).", "short",
              (Query("sum by (instance) (vllm:num_requests_waiting)", "{{instance}}"),)),
    )),
    Row("KV cache", (
        Panel("KV-cache usage", "Share of KV blocks in use per engine.", "percentunit",
              (Query("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),)),
        Panel("Prefix-cache hit rate", "Prompt tokens found in the prefix cache / looked up, per engine and "
              "for the fleet.", "percentunit",
              (Query(_ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "instance"),
                     "{{instance}}"),
               Query(_ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"), "fleet"))),
    )),
    Row("Throughput and latency", (
        Panel("Tokens per second", "Prompt tokens processed and tokens generated.", "short",
              (Query(f"sum by (instance) (rate(vllm:prompt_tokens_total[{RATE}]))", "prompt {{instance}}"),
               Query(f"sum by (instance) (rate(vllm:generation_tokens_total[{RATE}]))",
                     "generation {{instance}}"))),
        Panel("Engine TTFT p90", "Time to first token inside each engine (queue + prefill).", "s",
              (Query("histogram_quantile(0.9, sum by (le, instance) "
                     f"(rate(vllm:time_to_first_token_seconds_bucket[{RATE}])))", "{{instance}}"),)),
        Panel("Engine E2E p90", "Request latency inside each engine.", "s",
              (Query("histogram_quantile(0.9, sum by (le, instance) "
                     f"(rate(vllm:e2e_request_latency_seconds_bucket[{RATE}])))", "{{instance}}"),)),
        Panel("Finished requests", "Requests finished per second, by finish reason.", "reqps",
              (Query(f"sum by (finished_reason) (rate(vllm:request_success_total[{RATE}]))",
                     "{{finished_reason}}"),)),
    )),
)

DASHBOARDS: dict[str, tuple[str, str, tuple[Row, ...]]] = {
    # file stem: (uid, title, rows)
    "prefix-router": ("prefix-router", "prefix-router: routing", ROUTER_ROWS),
    "vllm-engines": ("prefix-router-engines", "prefix-router: vLLM engines", ENGINE_ROWS),
}


def all_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every query of every panel."""
    return [(stem, p.title, q.expr) for stem, (_, _, rows) in DASHBOARDS.items()
            for row in rows for p in row.panels for q in p.queries]


def _panel(p: Panel, panel_id: int) -> timeseries.Panel:
    panel = (timeseries.Panel().id(panel_id).title(p.title).description(p.description).unit(p.unit).span(p.width)
             .height(8).datasource(DATASOURCE).min(0)
             .legend(common_builder.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True)))
    for i, q in enumerate(p.queries):
        panel = panel.with_target(prometheus.Dataquery().expr(q.expr).legend_format(q.legend)
                                  .ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
    return panel


def build(stem: str) -> dict:
    uid, title, rows = DASHBOARDS[stem]
    board = (dashboard_builder.Dashboard(title).uid(uid).tags(["prefix-router", "vllm"]).refresh("10s")
             .time("now-1h", "now").timezone("browser").editable()
             .with_variable(dashboard_builder.DatasourceVariable("datasource").label("Data source")
                            .type("prometheus")))
    panel_id = 0
    for row in rows:
        panel_id += 1
        board = board.with_row(dashboard_builder.Row(row.title).id(panel_id))
        for p in row.panels:
            panel_id += 1
            board = board.with_panel(_panel(p, panel_id))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render(stem: str) -> str:
    return json.dumps(build(stem), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for stem in DASHBOARDS:
        path = OUT_DIR / f"{stem}.json"
        text = render(stem)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"stale: {path} (run python deploy/grafana/generate_dashboards.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
