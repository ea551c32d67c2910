# syntax=docker/dockerfile:1
# The engine server (python -m engine_server --backend vllm) on NVIDIA GPUs, on top of vLLM's own image
# (CUDA, torch and vLLM pinned together by the vLLM project). One container per GPU pair (TP 2).
#   docker build -f deploy/docker/engine-gpu.Dockerfile -t prefix-router-engine:0.1.0-gpu .
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
FROM ${VLLM_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf VLLM_NO_USAGE_STATS=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY deploy/docker/requirements-router.txt /tmp/requirements.txt
# xxhash is the only engine_server dependency vLLM's image does not already bring; install only that pin.
RUN grep -E '^xxhash==' /tmp/requirements.txt > /tmp/req-engine.txt \
    && python3 -m pip install --no-compile -r /tmp/req-engine.txt \
    && rm /tmp/requirements.txt /tmp/req-engine.txt
WORKDIR /opt/prefix-router
COPY pyproject.toml README.md ./
COPY router ./router
COPY engine_server ./engine_server
COPY config ./config
COPY openai_http ./openai_http
COPY kv_wire ./kv_wire
COPY benchmarks ./benchmarks
RUN python3 -m pip install --no-compile --no-deps /opt/prefix-router \
    && groupadd --system --gid 10001 engine \
    && useradd --system --uid 10001 --gid engine --home-dir /models --shell /usr/sbin/nologin engine \
    && mkdir -p /models/hf && chown -R engine:engine /models
USER 10001:10001
EXPOSE 8000
# /health is 503 while the model loads; the start period covers a large model's load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["python3", "-m", "engine_server", "--backend", "vllm", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "2"]
