#!/usr/bin/env bash
# The GPU-only tests (TensorRT engine builds): run on a machine with an NVIDIA GPU, its driver, and the
# builder's dependencies including tensorrt (e.g. inside the builder image: Dockerfile.builder).
#   scripts/gpu-tests.sh            # installs nothing; fails fast when something is missing
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys
try:
    import tensorrt, torch
except ImportError as exc:
    sys.exit(f"gpu-tests: {exc}; install with: pip install -e '.[builder,tensorrt,local,dev]'")
if not torch.cuda.is_available():
    sys.exit("gpu-tests: torch sees no CUDA GPU (check the driver and that torch is a CUDA build)")
from deepseek_contract.versions import TENSORRT_VERSION
print(f"tensorrt {tensorrt.__version__} (pinned {TENSORRT_VERSION}), torch {torch.__version__}, "
      f"GPU {torch.cuda.get_device_name(0)}")
PY
exec python -m pytest -m gpu -rs -v tests/gpu "$@"
