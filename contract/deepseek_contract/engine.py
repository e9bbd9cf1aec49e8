"""The engine inputs and the cache key: one function, used by the operator (is a build needed?) and the builder (where to put it).

An engine depends on the model's weights, the adapter, the task, the backend, the
precision, the shapes it was built for, the tool versions that built it and, for
TensorRT, the GPU it was built on.  Everything that changes the bytes of the
engine goes into the key; nothing that only changes how it is served does.

Two keys come from the same function:

* the *spec key* (``source_digest=None``): what the operator can know from the
  DeepSeekModel alone.  It names ``<cache>/refs/<spec key>.json``.
* the *content key* (``source_digest`` set): the builder adds the resolved source
  (an hf:// commit, S3 ETags, file sizes and hashes).  It names
  ``<cache>/engines/<content key>/``.  The ref points at it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from .versions import TENSORRT_VERSION

#: Bumped when the export or the engine layout changes in a way that invalidates old entries: it is part of
#: every key, so engines of an older format are rebuilt, never misread.
ENGINE_FORMAT_VERSION = 2

#: Bumped when how an ONNX Runtime ``int8`` engine is quantized changes (``deepseek_builder.ort_engine``): part of
#: the key of those engines only, so they are rebuilt while engines of the other precisions keep their keys.
#: 1: 8-bit per-channel weights.  2: 7-bit weights (``reduce_range``; why and what it measured: build/README.md).
ORT_INT8_RECIPE_VERSION = 2

KEY_LENGTH = 20  # hex chars: 80 bits, far beyond any cache's size, short enough for labels and paths


@dataclass(frozen=True)
class EngineInputs:
    """Everything that determines an engine's bytes."""

    source: str
    revision: Optional[str]
    task: str
    backend: str
    precision: str
    max_batch_size: int
    max_sequence_length: int
    adapter_source: Optional[str] = None
    adapter_revision: Optional[str] = None
    #: 'cpu' for CPU engines; for GPU engines the node's GPU product (nvidia.com/gpu.product) or compute capability.
    gpu_type: str = "cpu"
    #: Tool versions that change the engine: torch, transformers, onnx, onnxruntime, tensorrt.
    toolchain: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def recipe(backend: str, precision: str) -> tuple[tuple[str, str], ...]:
    """The versions of this project's own steps that shape an engine of ``backend`` and ``precision``: in the spec
    key and the content key alike."""
    tools = [("engine-format", str(ENGINE_FORMAT_VERSION))]
    if backend == "onnxruntime" and precision == "int8":
        tools.append(("ort-int8-recipe", str(ORT_INT8_RECIPE_VERSION)))
    return tuple(tools)


def default_toolchain(backend: str, precision: str) -> tuple[tuple[str, str], ...]:
    """The versions the operator expects its builder image to carry (the builder passes what it really has)."""
    tools = list(recipe(backend, precision))
    if backend == "tensorrt":
        tools.append(("tensorrt", TENSORRT_VERSION))
    return tuple(tools)


def engine_key(inputs: EngineInputs, source_digest: Optional[str] = None) -> str:
    """A short, stable hex key over the engine inputs (and the resolved source, for the content key)."""
    payload = asdict(inputs)
    payload["toolchain"] = sorted([list(t) for t in inputs.toolchain])
    if source_digest is not None:
        payload["source_digest"] = source_digest
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def gpu_type_for(gpus_per_replica: int, node_selector: dict[str, str]) -> str:
    """The GPU type an engine is built for: 'cpu', the GFD product label, or 'any-gpu' when unconstrained."""
    if gpus_per_replica == 0:
        return "cpu"
    return node_selector.get(GPU_PRODUCT_LABEL, "any-gpu")
