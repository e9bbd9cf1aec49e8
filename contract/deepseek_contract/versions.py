"""Pinned toolchain versions and image names.

An engine runs only under the TensorRT that built it, so the builder image pins the TensorRT of
the Triton release the operator deploys, and the version is part of the engine's cache key.
Dockerfile.builder and Dockerfile.triton carry the same numbers (a test reads them).
"""

from __future__ import annotations

#: The Triton release the operator deploys (its ``-py3`` image), and the TensorRT its tensorrt backend links. The
#: same release's ``-trtllm-python-py3`` image ships another TensorRT (10.10.0.31 in 25.06), so an engine built
#: here does not load there.
TRITON_RELEASE = "25.06"
TENSORRT_VERSION = "10.11.0.33"

#: This project's version (the images are tagged with it).
PROJECT_VERSION = "0.1.0"

IMAGE_REGISTRY = "ghcr.io/deepseek-operator"
OPERATOR_IMAGE = f"{IMAGE_REGISTRY}/deepseek-operator:{PROJECT_VERSION}"
BUILDER_IMAGE = f"{IMAGE_REGISTRY}/deepseek-builder:{PROJECT_VERSION}"
TRITON_IMAGE = f"{IMAGE_REGISTRY}/tritonserver:{TRITON_RELEASE}-py3"
