#!/usr/bin/env bash
# Install everything, generate the tiny model, start two real vLLM-CPU engine servers and the router in
# front of them, send one streamed request through the router, and keep serving until Ctrl-C.
#   ROUTER_PORT=8000 BASE_PORT=8001 REPLICAS=2 POLICY=cost DEMO_EXIT=1 (exit after the smoke request)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER_PORT=${ROUTER_PORT:-8000}
BASE_PORT=${BASE_PORT:-8001}
REPLICAS=${REPLICAS:-2}
POLICY=${POLICY:-cost}
MODEL_DIR=${MODEL_DIR:-models/tiny-llama}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

bash scripts/install.sh
[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python -m engine_server.tiny_model "$MODEL_DIR"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

rm -f .demo-replicas.yaml
echo "starting $REPLICAS vLLM-CPU replicas of $MODEL_DIR (about 20-60 s)..."
.venv/bin/python -m engine_server launch --cpu-replicas "$REPLICAS" --backend vllm --model "$MODEL_DIR" \
  --base-port "$BASE_PORT" --write-config .demo-replicas.yaml -- --max-model-len 2048 --default-max-tokens 32 &
pids+=($!)
for _ in $(seq 1 600); do [ -f .demo-replicas.yaml ] && break; sleep 1; done
[ -f .demo-replicas.yaml ] || { echo "replicas did not become healthy" >&2; exit 1; }

.venv/bin/python -m router --config .demo-replicas.yaml --port "$ROUTER_PORT" --policy "$POLICY" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ROUTER_PORT/health" >/dev/null && break; sleep 0.2; done

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
wait
