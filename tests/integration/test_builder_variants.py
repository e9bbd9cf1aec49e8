"""Every architecture and task, LoRA merging, ONNX Runtime precisions, and bad input, on tiny random models."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deepseek_builder.cli import build
from deepseek_builder.tiny import write_tiny_model

pytestmark = [pytest.mark.slow]

SEQ = 32
PROMPTS = [[0, 300, 301, 302, 303, 304], [0, 500, 501]]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("variants")


@pytest.fixture(scope="module")
def cache(ws) -> Path:
    return ws / "cache"


_models: dict = {}


def tiny(ws: Path, arch: str, task: str = "text-generation") -> Path:
    key = (arch, task)
    if key not in _models:
        _models[key] = write_tiny_model(ws / f"{arch}-{task}", arch=arch, task=task, seed=1)
    return _models[key]


def cli_build(source: Path, out: Path, cache: Path, *extra: str, precision: str = "fp32",
              task: str = "text-generation", backend: str = "onnxruntime"):
    return CliRunner().invoke(build, [
        "--source", f"file://{source}", "--task", task, "--backend", backend, "--precision", precision,
        "--max-batch-size", "4", "--max-seq-len", str(SEQ), "--output", str(out), "--cache-dir", str(cache), *extra])


def built_entry(out: Path, cache: Path) -> Path:
    report = json.loads((out / "build-report.json").read_text())
    return cache / "engines" / report["content_key"]


def left_padded(prompts=PROMPTS):
    width = max(map(len, prompts))
    ids = np.array([[1] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    return ids, mask


def engine_session(entry: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(entry / "engine/model.onnx"), providers=["CPUExecutionProvider"])


def prefill_logits(entry: Path, prompts=PROMPTS) -> np.ndarray:
    """One batched prefill of right-padded prompts through the serving runner (engine format 2)."""
    from deepseek_model_repository.serving.runners import open_runner

    info = json.loads((entry / "model-info.json").read_text())
    runner = open_runner(entry, info, slots=len(prompts), capacity=SEQ)
    width = max(map(len, prompts))
    ids = np.array([p + [1] * (width - len(p)) for p in prompts], dtype=np.int64)
    mask = np.array([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=np.int64)
    return runner.step(0, ids, mask)


def kv_input(info: dict) -> dict:
    return {t["name"]: t for t in info["inputs"]}["past_key_values.0.key"]


def torch_last_logits(model, prompts=PROMPTS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.stack([model(torch.tensor([p])).logits[0, -1].float().numpy() for p in prompts])


# ------------------------------------------------------------------ architectures
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen2", "llama"])
def test_text_generation_engine_of_each_architecture_equals_transformers(ws, cache, arch):
    from transformers import AutoModelForCausalLM

    source = tiny(ws, arch)
    out = ws / f"out-{arch}"
    result = cli_build(source, out, cache)
    assert result.exit_code == 0, result.output
    entry = built_entry(out, cache)
    info = json.loads((entry / "model-info.json").read_text())
    assert info["architecture"] == arch
    report = json.loads((entry / "build-report.json").read_text())
    assert report["check"]["max_rel_error"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    np.testing.assert_allclose(prefill_logits(entry), torch_last_logits(model), atol=2e-4, rtol=1e-3)


def test_classification_engine_gives_the_logits_of_the_last_real_token(ws, cache):
    import torch
    from transformers import AutoModelForSequenceClassification

    source = tiny(ws, "deepseek_v3", "text-classification")
    out = ws / "out-cls"
    result = cli_build(source, out, cache, task="text-classification")
    assert result.exit_code == 0, result.output
    entry = built_entry(out, cache)
    info = json.loads((entry / "model-info.json").read_text())
    assert info["labels"] == ["NEGATIVE", "POSITIVE"]
    assert info["outputs"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [2]}]
    assert "kv_cache" not in info
    ids, mask = left_padded()
    got = engine_session(entry).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    with torch.no_grad():
        want = np.stack([model(torch.tensor([p])).logits[0].numpy() for p in PROMPTS])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_feature_extraction_engine_mean_pools_over_the_mask(ws, cache):
    import torch
    from transformers import AutoModel

    source = tiny(ws, "deepseek_v2", "feature-extraction")
    out = ws / "out-emb"
    result = cli_build(source, out, cache, task="feature-extraction")
    assert result.exit_code == 0, result.output
    entry = built_entry(out, cache)
    info = json.loads((entry / "model-info.json").read_text())
    assert info["outputs"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [64]}]
    ids, mask = left_padded()
    got = engine_session(entry).run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    model = AutoModel.from_pretrained(source).eval()
    with torch.no_grad():
        want = np.stack([model(torch.tensor([p])).last_hidden_state[0].mean(0).numpy() for p in PROMPTS])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------ LoRA
def make_adapter(base: Path, out: Path, targets: list[str]) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def test_lora_merged_engine_equals_the_adapted_model(ws, cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny(ws, "deepseek_v3")
    adapter = make_adapter(base, ws / "lora-v3", ["q_b_proj", "kv_b_proj", "o_proj"])
    out = ws / "out-lora"
    result = cli_build(base, out, cache, "--adapter", f"file://{adapter}")
    assert result.exit_code == 0, result.output
    assert "merge: started" in result.output
    entry = built_entry(out, cache)
    report = json.loads((entry / "build-report.json").read_text())
    assert report["adapter"] == f"file://{adapter}" and report["adapter_revision"].startswith("sha256:")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    got = prefill_logits(entry)
    np.testing.assert_allclose(got, torch_last_logits(adapted), atol=2e-4, rtol=1e-3)
    assert np.abs(got - torch_last_logits(plain)).max() > 1e-2, "the adapter changed nothing"


def test_adapter_for_another_architecture_is_refused_clearly(ws, cache):
    base = tiny(ws, "deepseek_v3")
    adapter = make_adapter(tiny(ws, "llama"), ws / "lora-llama", ["q_proj", "v_proj"])
    result = cli_build(base, ws / "out-badlora", cache, "--adapter", f"file://{adapter}")
    assert result.exit_code == 1
    assert "another architecture" in result.output and "Traceback" not in result.output


def test_adapter_for_another_model_size_is_refused_clearly(ws, cache):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from deepseek_builder.tiny import tiny_config

    config = tiny_config("llama", 129280)
    config.hidden_size, config.intermediate_size = 32, 64
    small = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    small.save_pretrained(ws / "lora-small-llama")
    result = cli_build(tiny(ws, "llama"), ws / "out-badsize", cache, "--adapter", f"file://{ws / 'lora-small-llama'}")
    assert result.exit_code == 1 and "does not fit this llama model" in result.output
    assert "size mismatch" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ precisions
@pytest.mark.parametrize("precision, kv_type", [("fp16", "TYPE_FP16"), ("int8", "TYPE_FP32")])
def test_onnxruntime_precisions_build_checked_engines(ws, cache, precision, kv_type, caplog):
    from transformers import AutoModelForCausalLM

    source = tiny(ws, "llama")
    out = ws / f"out-{precision}"
    result = cli_build(source, out, cache, precision=precision)
    assert result.exit_code == 0, result.output
    entry = built_entry(out, cache)
    info = json.loads((entry / "model-info.json").read_text())
    report = json.loads((entry / "build-report.json").read_text())
    assert info["precision"] == precision
    assert info["outputs"][0]["data_type"] == "TYPE_FP32" and kv_input(info)["data_type"] == kv_type
    assert report["check"]["engine"]["threshold"] > 1e-4 and report["check"]["export"]["max_rel_error"] < 1e-4
    assert report["sizes"]["engine_bytes"] < report["sizes"]["onnx_bytes"]
    want = torch_last_logits(AutoModelForCausalLM.from_pretrained(source).eval())
    got = prefill_logits(entry)
    # Same greedy choice as the fp32 model on these prompts, within the precision's error.
    assert np.abs(got - want).max() / np.abs(want).max() <= report["check"]["engine"]["threshold"]
    # Served on the CPU, an fp16 engine's cache is converted in every step, and the runner says so.
    from deepseek_model_repository.serving.runners import open_runner

    with caplog.at_level(logging.WARNING, logger="deepseek_model_repository.serving.runners"):
        open_runner(entry, info, 2, 32)
    warned = [r.getMessage() for r in caplog.records if "fp16 engine on the CPU" in r.getMessage()]
    assert bool(warned) == (precision == "fp16") and all("engine.precision fp32" in m for m in warned)


def test_tensorrt_without_tensorrt_or_gpu_fails_clearly(ws, cache):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here; tests/gpu covers it")
    except ImportError:
        pass
    result = cli_build(tiny(ws, "deepseek_v3"), ws / "out-trt", cache, precision="fp16", backend="tensorrt")
    assert result.exit_code == 1 and "tensorrt" in result.output and "Traceback" not in result.output
    result = cli_build(tiny(ws, "deepseek_v3"), ws / "out-trt", cache, precision="int8", backend="tensorrt")
    assert result.exit_code == 1 and "quantized ONNX" in result.output


# ------------------------------------------------------------------ bad input
def no_entries(cache: Path, before: set) -> bool:
    after = set((cache / "engines").iterdir()) if (cache / "engines").exists() else set()
    tmp = list((cache / "tmp").iterdir()) if (cache / "tmp").exists() else []
    return after == before and not tmp


def entries(cache: Path) -> set:
    return set((cache / "engines").iterdir()) if (cache / "engines").exists() else set()


def test_corrupt_safetensors_fails_clearly_and_leaves_no_entry(ws, cache):
    broken = ws / "broken"
    shutil.copytree(tiny(ws, "qwen2"), broken)
    weights = next(broken.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = entries(cache)
    result = cli_build(broken, ws / "out-broken", cache)
    assert result.exit_code == 1
    assert "corrupt or truncated" in result.output and weights.name in result.output
    assert "Traceback" not in result.output
    assert no_entries(cache, before)


def test_unsupported_architecture_is_refused_by_name(ws, cache):
    other = ws / "gpt2ish"
    shutil.copytree(tiny(ws, "llama"), other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    result = cli_build(other, ws / "out-gpt2", cache)
    assert result.exit_code == 1 and "'gpt2' is not supported" in result.output and "deepseek_v3" in result.output


def test_missing_source_is_a_clear_error(ws, cache):
    result = cli_build(ws / "does-not-exist", ws / "out-missing", cache)
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(build, ["--source", "ftp://x/y", "--backend", "onnxruntime", "--precision", "fp32",
                                        "--max-batch-size", "1", "--max-seq-len", "16", "--output", str(ws / "o")])
    assert result.exit_code == 1 and "unsupported source" in result.output


def test_full_disk_fails_with_a_clear_message(ws):
    """The cache on a 24 MB tmpfs: the 60 MB export cannot fit (needs root to mount; skipped otherwise)."""
    mount = ws / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = cli_build(tiny(ws, "deepseek_v3"), ws / "out-full", mount / "cache")
        assert result.exit_code == 1, result.output
        assert "no space left" in result.output and "Traceback" not in result.output
        assert not list((mount / "cache" / "engines").iterdir())
        assert not list((mount / "cache" / "tmp").iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)
