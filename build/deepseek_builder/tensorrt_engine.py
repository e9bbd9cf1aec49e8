"""TensorRT engines (TensorRT 10.x, strongly typed networks) from the exported ONNX graph.

Precision lives in the ONNX graph: the model is exported in fp16 or bf16 and the network is parsed
strongly typed, so TensorRT keeps every tensor's type (BuilderFlag.FP16/INT8 are gone in TensorRT 11).
int8 and fp8 need Q/DQ nodes in the graph, which this builder does not produce yet: they are refused.
``tensorrt`` is imported only here, only when a TensorRT build is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from deepseek_contract.versions import TENSORRT_VERSION, TRITON_RELEASE
from deepseek_contract.vocabulary import BACKEND_PRECISIONS

from .errors import BuildError

PRECISIONS = BACKEND_PRECISIONS["tensorrt"]
#: Builder workspace limit: generous, the optimiser uses what it needs.
WORKSPACE_BYTES = 8 << 30


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError(f"--backend tensorrt needs the tensorrt Python package {TENSORRT_VERSION} (the TensorRT of "
                         f"Triton {TRITON_RELEASE}) and an NVIDIA GPU: run the build in the builder image, or "
                         "pip install 'deepseek-operator[tensorrt]' on a GPU machine; use --backend onnxruntime "
                         "for a CPU engine") from None
    return trt


def check_tensorrt_available(precision: str) -> None:
    """Refuse a TensorRT build that cannot produce an engine Triton will load, before any work."""
    if precision in ("int8", "fp8"):
        raise BuildError(f"TensorRT {precision} engines need a quantized ONNX graph (Q/DQ nodes, e.g. from NVIDIA "
                         "ModelOpt), which this builder does not produce yet; use --precision fp16 or bf16")
    if precision not in PRECISIONS:
        raise BuildError(f"TensorRT engines are built in {', '.join(PRECISIONS)} here, not {precision}")
    trt = _import_tensorrt()
    if trt.__version__ != TENSORRT_VERSION:
        raise BuildError(f"installed tensorrt is {trt.__version__} but Triton {TRITON_RELEASE} runs TensorRT "
                         f"{TENSORRT_VERSION}; an engine only loads under the TensorRT that built it: "
                         f"pip install tensorrt-cu12=={TENSORRT_VERSION}")
    import torch

    if not torch.cuda.is_available():
        raise BuildError("--backend tensorrt needs an NVIDIA GPU visible to this process (none found; check "
                         "the Job's nvidia.com/gpu limit and the node's driver)")
    if precision == "bf16" and torch.cuda.get_device_capability(0) < (8, 0):
        raise BuildError(f"{torch.cuda.get_device_name(0)} has no bf16 (it needs compute capability 8.0, Ampere, or "
                         "later): use --precision fp16 on this GPU")


def _profile_shapes(spec, max_batch: int, max_seq: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) per input.  Text generation (engine format 2): batch 1..max, new tokens 1..max,
    the cache rows' capacity 1..max (the serving cache's capacity is the maximum)."""
    opt_batch = max(1, max_batch // 2)
    opt_seq = max(1, min(128, max_seq // 2))
    shapes = {}
    if spec.task == "text-generation":
        for name in ("input_ids", "position_ids", "token_mask"):
            shapes[name] = ((1, 1), (opt_batch, 1), (max_batch, max_seq))
        shapes["cache_lengths"] = ((1,), (opt_batch,), (max_batch,))
        for i, layout in enumerate(spec.kv):
            for name, heads, dim in ((f"past_key_values.{i}.key", layout.key_heads, layout.key_dim),
                                     (f"past_key_values.{i}.value", layout.value_heads, layout.value_dim)):
                shapes[name] = ((1, heads, 1, dim), (opt_batch, heads, max_seq, dim), (max_batch, heads, max_seq, dim))
        return shapes
    for name in ("input_ids", "attention_mask"):
        shapes[name] = ((1, 1), (opt_batch, opt_seq), (max_batch, max_seq))
    return shapes


def build_tensorrt_engine(onnx_file: Path, plan_file: Path, spec, *, max_batch: int, max_seq: int,
                          timing_cache: Path, log: Callable[[str], None]) -> None:
    """Parse the ONNX graph strongly typed, add one optimisation profile, build and write ``model.plan``."""
    trt = _import_tensorrt()

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # noqa: D401 - TensorRT's callback
            if severity in shown:
                log(f"tensorrt: {msg}")

    shown = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING)
    logger = Logger()
    builder = trt.Builder(logger)
    # TensorRT 10 asks for strong typing with a flag; from 11 every network is strongly typed.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _profile_shapes(spec, max_batch, max_seq).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    # The profile reaches a prefill of the whole context in every row, which the scheduler never sends: let the
    # serving runner size activation memory for each step's shapes instead (TensorRT 10.10 on).
    resize = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None and spec.task == "text-generation":
        config.set_preview_feature(resize, True)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None:  # an unreadable cache file (another TensorRT's, or truncated): start an empty one
        log(f"ignoring the unreadable timing cache {timing_cache}")
        blob = b""
        cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        log(f"the timing cache {timing_cache} was not attached (made on another device?): building without it")
    log(f"building (timing cache {timing_cache}, {len(blob)} bytes); this takes minutes on a large model")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine; the tensorrt lines above say why")
    with open(plan_file, "wb") as out:  # the plan's own buffer, not a copy of it (plans of large models are GBs)
        out.write(serialized)
    # The build added its measurements to the attached cache: keep them for the next build on this GPU type.
    tmp = timing_cache.with_name(f"{timing_cache.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(cache.serialize()))
    os.replace(tmp, timing_cache)


def tensorrt_runner(plan_file: Path, spec):
    """A function running the plan on the GPU with torch tensors as buffers (numpy in, numpy out)."""
    import torch

    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_file.read_bytes())
    if engine is None:
        raise BuildError(f"TensorRT could not load the plan it just built ({plan_file}); the tensorrt lines above say why")
    context = engine.create_execution_context()
    to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
                trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        stream = torch.cuda.current_stream()
        keep = []
        for name in spec.input_names:
            dtype = to_torch[engine.get_tensor_dtype(name)]
            tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to("cuda").to(dtype).contiguous()
            keep.append(tensor)
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise BuildError(f"the numerical check's input {name} of shape {tuple(tensor.shape)} is outside the "
                                 "plan's optimisation profile")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in spec.output_names:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=to_torch[engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(stream.cuda_stream):
            raise BuildError("TensorRT execution failed during the numerical check")
        stream.synchronize()
        return [o.float().cpu().numpy() for o in outputs]

    return run
