"""TensorRT engines on a real GPU: run with scripts/gpu-tests.sh on a machine with an NVIDIA GPU and tensorrt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner


def _gpu_ready() -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt package is not installed (pip install 'deepseek-operator[tensorrt]')"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    return True, ""


_READY, _WHY = _gpu_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not _READY, reason=_WHY or "gpu")]

SEQ = 64


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trt")


@pytest.fixture(scope="module")
def tiny(ws) -> Path:
    from deepseek_builder.tiny import write_tiny_model

    return write_tiny_model(ws / "tiny-v3", arch="deepseek_v3", seed=2)


def trt_build(source: Path, out: Path, cache: Path, precision: str = "fp16"):
    from deepseek_builder.cli import build

    return CliRunner().invoke(build, ["--source", f"file://{source}", "--backend", "tensorrt", "--precision",
                                      precision, "--max-batch-size", "4", "--max-seq-len", str(SEQ),
                                      "--output", str(out), "--cache-dir", str(cache)])


@pytest.fixture(scope="module")
def built(ws, tiny):
    result = trt_build(tiny, ws / "out", ws / "cache")
    assert result.exit_code == 0, result.output
    report = json.loads((ws / "out" / "build-report.json").read_text())
    return ws / "cache" / "engines" / report["content_key"], report


def test_fp16_engine_builds_and_passes_the_numerical_check(built):
    entry, report = built
    assert (entry / "engine" / "model.plan").stat().st_size > 1_000_000
    assert report["check"]["engine"]["passed"] and report["check"]["max_rel_error"] <= 2e-2
    assert report["gpu"]["name"] and report["gpu"]["compute_capability"]
    assert report["versions"]["tensorrt"] == report["pinned"]["tensorrt"]
    info = json.loads((entry / "model-info.json").read_text())
    kv = {t["name"]: t for t in info["inputs"]}["past_key_values.0.key"]
    assert info["engine_file"] == "engine/model.plan" and kv["data_type"] == "TYPE_FP16"
    # The check drove the engine through a prefill and decode steps at several cache fill levels.
    assert len(report["check"]["engine"]["cases"]) >= 5


def test_timing_cache_is_kept_and_second_build_is_a_cache_hit(built, ws, tiny):
    assert list((ws / "cache" / "timing").glob("*.cache"))
    result = trt_build(tiny, ws / "out2", ws / "cache")
    assert result.exit_code == 0 and "reused" in result.output and "engine: started" not in result.output


def test_int8_is_refused_until_quantized_onnx_exists(ws, tiny):
    result = trt_build(tiny, ws / "out-int8", ws / "cache", precision="int8")
    assert result.exit_code == 1 and "quantized ONNX" in result.output
