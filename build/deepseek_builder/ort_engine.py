"""ONNX Runtime (CPU) engines: the fp32 export as it is, converted to fp16, or int8 dynamic quantisation."""

from __future__ import annotations

import shutil
from pathlib import Path

from deepseek_contract.vocabulary import BACKEND_PRECISIONS

from .errors import BuildError

PRECISIONS = BACKEND_PRECISIONS["onnxruntime"]
#: Above this the graph keeps its weights in model.onnx.data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _onnx_bytes(model_file: Path) -> int:
    return sum(p.stat().st_size for p in model_file.parent.glob(model_file.name + "*"))


def _save(model, out_file: Path, large: bool) -> None:
    import onnx

    if large:
        onnx.save_model(model, str(out_file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_file.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(out_file))


def build_ort_engine(exported: Path, out_file: Path, precision: str, float_outputs: list[str]) -> None:
    """Write the engine for ``precision`` from the fp32 export; ``float_outputs`` stay float32."""
    if precision not in PRECISIONS:
        raise BuildError(f"onnxruntime engines are fp32, fp16 or int8, not {precision}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    large = _onnx_bytes(exported) > EXTERNAL_DATA_BYTES
    if precision == "fp32":
        for p in exported.parent.glob(exported.name + "*"):
            shutil.copyfile(p, out_file.parent / p.name.replace(exported.name, out_file.name, 1))
        return
    import onnx

    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(exported), load_external_data=True)
        # Logits/embeddings keep float32 at the boundary (ENGINE_FORMAT.md); the KV cache becomes float16.
        model = convert_float_to_float16(model, keep_io_types=float_outputs, disable_shape_infer=large)
        _save(model, out_file, large)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import logging

    graph = onnx.load(str(exported), load_external_data=False).graph

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for convolutional models
    try:  # a change to these arguments bumps deepseek_contract.engine.ORT_INT8_RECIPE_VERSION
        quantize_dynamic(str(exported), str(out_file), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=large,
                         nodes_to_exclude=_batched_weight_matmuls(graph))
    finally:
        root.setLevel(level)


def _batched_weight_matmuls(graph) -> list[str]:
    """MatMuls whose weight is not a 2-D matrix (MLA's absorbed per-head projections, [H, D, R]).

    ONNX Runtime's integer MatMul takes per-channel zero points only for a 2-D weight, so these stay float.
    """
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and ranks.get(n.input[1], 2) != 2]
