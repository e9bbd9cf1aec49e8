#!/usr/bin/env bash
# The GPU-only tests, one line per GPU path. Run on a machine with an NVIDIA GPU, its driver and torch with
# CUDA; the TensorRT and ONNX Runtime CUDA paths also need tensorrt / onnxruntime-gpu (e.g. inside the builder
# image, Dockerfile.builder) and are skipped with the reason where those are missing.
#   scripts/gpu-tests.sh            # installs nothing; fails fast when torch sees no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
"$PY" - <<'PYTHON'
import importlib.util, sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu-tests: {exc}; install with: pip install -e '.[builder,local,dev]'")
if not torch.cuda.is_available():
    sys.exit("gpu-tests: torch sees no CUDA GPU (check the driver and that torch is a CUDA build)")
from deepseek_contract.versions import TENSORRT_VERSION
trt = importlib.util.find_spec("tensorrt") is not None
ort_cuda = False
if importlib.util.find_spec("onnxruntime"):
    import onnxruntime
    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
print(f"torch {torch.__version__}, GPU {torch.cuda.get_device_name(0)}; tensorrt: {trt} (pinned {TENSORRT_VERSION}); "
      f"onnxruntime CUDA provider: {ort_cuda}")
PYTHON
status=0
run() { "$PY" -m pytest -m gpu -rs -v "$@" || status=1; }
# The scheduler and its device-resident KV cache on the PyTorch runner, whole and chunked prefill (torch with CUDA only).
run "tests/gpu/test_serving_gpu.py::test_pytorch_runner_on_cuda_equals_transformers_with_the_cache_on_the_device"
# ONNX Runtime's CUDA provider with I/O binding over device buffers (onnxruntime-gpu).
run "tests/gpu/test_serving_gpu.py::test_onnxruntime_cuda_runner_equals_transformers"
# TensorRT: the runner's steps over device buffers against fp16 torch (tensorrt).
run "tests/gpu/test_serving_gpu.py::test_tensorrt_runner_steps_with_logits_close_to_torch_and_the_cache_on_the_device"
# TensorRT engine builds: strongly typed fp16, numerical check, timing cache, cache hit, int8 refused (tensorrt).
run tests/gpu/test_builder_tensorrt.py "$@"
# Not a test: a decode step's KV-cache write on the GPU against row by row (prints its table).
"$PY" bench/serving/cache_write.py --output "${CACHE_WRITE_RESULTS:-/tmp/cache_write.json}" || status=1
exit $status
