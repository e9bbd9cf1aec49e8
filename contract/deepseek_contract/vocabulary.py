"""The one vocabulary: tasks, backends, precisions and architectures, as ``Literal`` types.

The API model, the builder's CLI and checks, and the model repository take their choices
from here; ``get_args`` gives the tuples.
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["text-generation", "text-classification", "feature-extraction"]
Backend = Literal["tensorrt", "onnxruntime"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
Architecture = Literal["deepseek_v3", "deepseek_v2", "qwen2", "llama"]

TASKS: tuple[str, ...] = get_args(Task)
BACKENDS: tuple[str, ...] = get_args(Backend)
PRECISIONS: tuple[str, ...] = get_args(Precision)
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

#: Precisions each backend builds.  ONNX Runtime converts the fp32 export; TensorRT builds strongly
#: typed fp16/bf16 networks (int8/fp8 need quantized Q/DQ ONNX, which the exporter does not write yet).
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("fp32", "fp16", "int8"),
    "tensorrt": ("fp16", "bf16"),
}

#: What each architecture is, for error messages and docs.
ARCHITECTURE_FAMILIES: dict[str, str] = {
    "deepseek_v3": "DeepSeek-V3 / R1 (MLA attention, MoE)",
    "deepseek_v2": "DeepSeek-V2 / V2-Lite (MLA attention, MoE)",
    "qwen2": "DeepSeek-R1-Distill-Qwen",
    "llama": "DeepSeek-R1-Distill-Llama, DeepSeek-Coder",
}

#: Source URL schemes the builder can fetch.
SOURCE_SCHEMES: tuple[str, ...] = ("hf", "s3", "pvc", "file")


def needs_gpu(backend: str) -> bool:
    """Whether engines of ``backend`` are built and served on an NVIDIA GPU only."""
    return backend == "tensorrt"
