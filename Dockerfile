# syntax=docker/dockerfile:1
# The operator image: `deepseek-operator` with its core dependencies only (no builder, TensorRT or
# local-mode extras). It runs the kopf operator, and the Triton pods' init container runs it too
# (it writes the model repository). Build from the repository root:
#
#   docker build -t ghcr.io/deepseek-operator/deepseek-operator:0.1.0 .
#
# Dockerfile.builder (the engine build Jobs) and Dockerfile.triton (the serving image) are separate.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- wheel: build the package from the sources it needs, and nothing else
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY operator/ operator/
COPY build/ build/
COPY model_repository/ model_repository/
COPY contract/ contract/
COPY local/ local/
COPY cli/ cli/
# Same as `pip install .`, in two steps so the runtime stage gets no sources and no build scratch
# (setup.cfg keeps setuptools' scratch out of ./build/, the builder package's folder).
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl \
 && groupadd --system --gid 65532 deepseek \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin deepseek

LABEL org.opencontainers.image.title="deepseek-operator" \
      org.opencontainers.image.description="Kubernetes operator serving DeepSeek models on Triton Inference Server" \
      org.opencontainers.image.source="https://github.com/deepseek-operator/deepseek-operator" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric, so the kubelet can verify runAsNonRoot.
USER 65532:65532
WORKDIR /tmp
# 8080: liveness (/healthz); 9090: Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["deepseek-operator"]
CMD ["run", "--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz", "--metrics-port", "9090"]
