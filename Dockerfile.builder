# syntax=docker/dockerfile:1
# The engine-build Job's image: `deepseek-operator build ...` with torch, transformers, ONNX, ONNX Runtime
# and the TensorRT of the Triton release the operator serves with.  An engine runs only under the
# TensorRT that built it, so TENSORRT_VERSION must equal deepseek_contract.versions.TENSORRT_VERSION
# (the builder refuses to build when they differ).  Everything comes from pip wheels (CUDA runtime
# libraries included); the node supplies only the NVIDIA driver.
#
#   docker build -f Dockerfile.builder -t ghcr.io/deepseek-operator/builder:25.06 .
#
# TORCH_INDEX picks torch's CUDA 12 build, the CUDA major version tensorrt-cu12 links against.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TENSORRT_VERSION=10.11.0.33
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu129
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUTF8=1 PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 DEEPSEEK_OPERATOR_CACHE=/cache

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY operator ./operator
COPY build ./build
COPY model_repository ./model_repository
COPY contract ./contract
COPY local ./local
COPY cli ./cli
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==2.13.0" \
 && pip install --extra-index-url https://pypi.nvidia.com ".[builder,tensorrt]" "tensorrt-cu12==${TENSORRT_VERSION}" \
 && python -c "import tensorrt, deepseek_builder.cli; assert tensorrt.__version__ == '${TENSORRT_VERSION}'"

RUN useradd --create-home --uid 1000 builder && mkdir -p /cache && chown builder /cache
USER 1000
WORKDIR /home/builder
ENTRYPOINT ["deepseek-operator"]
CMD ["build", "--help"]
