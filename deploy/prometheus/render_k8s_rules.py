"""Write deploy/k8s/base/alerts.yaml: alerts.yml wrapped in a Prometheus Operator PrometheusRule.

alerts.yml stays the one source (promtool checks and unit-tests it); the Kubernetes copy is generated and
a test (tests/deploy/test_manifests.py) fails when it is stale.

    python deploy/prometheus/render_k8s_rules.py           # rewrite
    python deploy/prometheus/render_k8s_rules.py --check   # exit 1 if stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE.parent / "k8s/base/alerts.yaml"
HEADER = ("# GENERATED from deploy/prometheus/alerts.yml by deploy/prometheus/render_k8s_rules.py; do not edit.\n"
          "# The alert rules for clusters with the Prometheus Operator (picked up like the ServiceMonitors).\n")


def render() -> str:
    rules = yaml.safe_load(SOURCE.read_text())
    obj = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "prefix-router-alerts"}, "spec": {"groups": rules["groups"]}}
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=110)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"stale: {TARGET} (run python deploy/prometheus/render_k8s_rules.py)", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
