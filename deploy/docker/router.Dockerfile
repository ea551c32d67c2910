# syntax=docker/dockerfile:1
# The router (python -m router), slim: only the router's runtime dependencies, no vLLM, no torch.
# The same image runs simulated engines (python -m engine_server --backend sim) for CPU demos.
#   docker build -f deploy/docker/router.Dockerfile -t prefix-router:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY deploy/docker/requirements-router.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-compile -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY router ./router
COPY engine_server ./engine_server
COPY config ./config
COPY openai_http ./openai_http
COPY kv_wire ./kv_wire
COPY benchmarks ./benchmarks
RUN /opt/venv/bin/pip install --no-compile --no-deps /src

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="prefix-router" \
      org.opencontainers.image.description="Prefix-cache-aware router for vLLM replicas" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 router \
    && useradd --system --uid 10001 --gid router --no-create-home --shell /usr/sbin/nologin router
COPY --from=build /opt/venv /opt/venv
COPY config/examples/router.yaml /etc/prefix-router/router.yaml
WORKDIR /home/router
USER 10001:10001
EXPOSE 8000
# /health is 503 while draining or with no healthy replica.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["python", "-m", "router"]
CMD ["--config", "/etc/prefix-router/router.yaml"]
