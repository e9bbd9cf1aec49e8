"""The builder's small parts: keys, the cache's publish rule, file hashing, sources, masks, progress, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_builder import sources
from deepseek_builder.cache import EngineCache, default_cache_dir
from deepseek_builder.errors import BuildError
from deepseek_builder.progress import Progress
from deepseek_contract.engine import EngineInputs, default_toolchain, engine_key


def test_cli_imports_without_torch():
    code = "import sys, deepseek_builder.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_spec_key_is_the_operators_key(tmp_path):
    from deepseek_builder.api import default_request

    request = default_request(source="hf://deepseek-ai/DeepSeek-V3", revision="abc", task="text-generation",
                              backend="tensorrt", precision="fp16", max_batch_size=8, max_sequence_length=4096,
                              adapter_source=None, adapter_revision=None, gpu_type="NVIDIA-H100-80GB-HBM3",
                              cache_dir=str(tmp_path))
    want = EngineInputs(source="hf://deepseek-ai/DeepSeek-V3", revision="abc", task="text-generation",
                        backend="tensorrt", precision="fp16", max_batch_size=8, max_sequence_length=4096,
                        gpu_type="NVIDIA-H100-80GB-HBM3", toolchain=default_toolchain("tensorrt", "fp16"))
    assert engine_key(request.inputs) == engine_key(want)


def test_the_int8_recipe_keys_int8_onnxruntime_engines_only(tmp_path, monkeypatch):
    """A change to how ONNX Runtime int8 engines are quantized rebuilds those, and only those; the builder's spec key
    stays the operator's (which knows the precision from the spec alone)."""
    import deepseek_contract.engine as contract
    from deepseek_builder.api import default_request, real_toolchain

    def key(precision):
        request = default_request(source="file:///m", revision=None, task="text-generation", backend="onnxruntime",
                                  precision=precision, max_batch_size=4, max_sequence_length=64, adapter_source=None,
                                  adapter_revision=None, gpu_type="cpu", cache_dir=str(tmp_path))
        return engine_key(request.inputs)

    assert ("ort-int8-recipe", str(contract.ORT_INT8_RECIPE_VERSION)) in default_toolchain("onnxruntime", "int8")
    assert not any(name == "ort-int8-recipe" for name, _ in default_toolchain("onnxruntime", "fp32"))
    assert not any(name == "ort-int8-recipe" for name, _ in default_toolchain("tensorrt", "fp16"))
    int8 = EngineInputs(source="file:///m", revision=None, task="text-generation", backend="onnxruntime",
                        precision="int8", max_batch_size=4, max_sequence_length=64)
    assert dict(real_toolchain(int8, None))["ort-int8-recipe"] == str(contract.ORT_INT8_RECIPE_VERSION)
    before = {p: key(p) for p in ("fp32", "fp16", "int8")}
    monkeypatch.setattr(contract, "ORT_INT8_RECIPE_VERSION", contract.ORT_INT8_RECIPE_VERSION + 1)
    after = {p: key(p) for p in ("fp32", "fp16", "int8")}
    assert after["fp32"] == before["fp32"] and after["fp16"] == before["fp16"]
    assert after["int8"] != before["int8"]


def test_default_cache_dir_prefers_flag_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSEEK_OPERATOR_CACHE", str(tmp_path / "env"))
    assert default_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert default_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DEEPSEEK_OPERATOR_CACHE")
    assert default_cache_dir(None) == Path.home() / ".cache" / "deepseek-operator"


def staged(cache: EngineCache, marker: str) -> Path:
    work = cache.new_workdir() / "entry"
    work.mkdir()
    for name in ("model-info.json", "build-report.json"):
        (work / name).write_text(marker)
    return work


def test_second_publisher_of_a_key_discards_its_copy(tmp_path):
    cache = EngineCache(tmp_path)
    first, second = staged(cache, "first"), staged(cache, "second")
    entry, won = cache.publish(first, "k1")
    assert won and (entry / "model-info.json").read_text() == "first"
    entry2, won2 = cache.publish(second, "k1")
    assert not won2 and entry2 == entry and not second.exists()
    assert (entry / "model-info.json").read_text() == "first"


def test_an_entry_without_its_markers_is_not_reused(tmp_path):
    cache = EngineCache(tmp_path)
    broken = cache.entry("k2")
    (broken / "engine").mkdir(parents=True)
    entry, problem = cache.inspect("k2")
    assert entry is None and cache.finished("k2") is None and "no manifest.json" in problem
    cache.discard("k2")
    assert not broken.exists() and not list((tmp_path / "tmp").iterdir())


def test_file_hashes_are_reused_by_path_size_and_mtime(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    hashes = sources.FileHashCache(tmp_path / "hashes.json")
    digest, size = sources.folder_digest(folder, hashes)
    assert size == 1000
    hashes.save()
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; restore the mtime: the remembered hash is used
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reloaded = sources.FileHashCache(tmp_path / "hashes.json")
    assert sources.folder_digest(folder, reloaded)[0] == digest
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert sources.folder_digest(folder, reloaded)[0] != digest


def test_folder_digest_covers_names_and_contents(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text("{}")
    (a / "x.bin").write_text("1")
    (b / "y.bin").write_text("1")
    hashes = sources.FileHashCache(None)
    assert sources.folder_digest(a, hashes)[0] != sources.folder_digest(b, hashes)[0]


def test_pvc_sources_are_read_under_the_mount_root(tmp_path, monkeypatch):
    model = tmp_path / "claim-a" / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')  # passes the checks made before hashing
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    monkeypatch.setenv("DEEPSEEK_OPERATOR_PVC_ROOT", str(tmp_path))
    resolved = sources.resolve("pvc://claim-a/models/tiny", None, sources.FileHashCache(None))
    assert resolved.local_dir == model
    assert resolved.digest == sources.resolve(f"file://{model}", None, sources.FileHashCache(None)).digest
    monkeypatch.delenv("DEEPSEEK_OPERATOR_PVC_ROOT")
    assert sources.local_path_of("pvc://claim/p/q") == Path("/mnt/pvc/claim/p/q")


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/model", "unsupported source"),
    ("pvc:///no-claim", "needs a claim name"),
    ("hf://only-one-part", "hf://<org>/<name>"),
])
def test_malformed_sources_are_refused(uri, message):
    with pytest.raises(BuildError, match=message):
        if uri.startswith("hf://"):
            sources.resolve_hf(uri, None)
        else:
            sources.resolve(uri, None, sources.FileHashCache(None))


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(BuildError, match="not a folder"):
        sources.resolve(f"file://{f}", None, sources.FileHashCache(None))


def test_progress_lines_are_stamped_and_name_the_stage():
    lines = []
    progress = Progress(lines.append)
    with progress.stage("export", "ONNX"):
        progress.say("66.7 MB")
    with pytest.raises(RuntimeError):
        with progress.stage("check"):
            raise RuntimeError("boom")
    assert lines[0].endswith("[build] export: started - ONNX") and lines[0][:4].isdigit()
    assert lines[1].endswith("[build] export: 66.7 MB")
    assert "[build] export: done in" in lines[2] and "[build] check: failed after" in lines[-1]
    assert set(progress.timings) == {"export", "check"}
    assert all("\r" not in line for line in lines)


def test_padding_mask_blocks_padding_and_the_future():
    import torch

    from deepseek_builder.export import padding_causal_mask, positions_from_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    add = padding_causal_mask(mask, 2, torch.float32)  # 3 cached tokens, 2 new ones
    assert add.shape == (2, 1, 2, 5)
    allowed = add[:, 0] == 0
    assert allowed[0].tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    assert allowed[1].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    # A padding query sees itself only, so no row is entirely masked.
    prefill = padding_causal_mask(torch.tensor([[0, 1, 1]]), 3, torch.float32)[0, 0] == 0
    assert prefill.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_tensorrt_precisions_are_checked_before_any_work():
    from deepseek_builder.tensorrt_engine import check_tensorrt_available

    for precision in ("int8", "fp8"):
        with pytest.raises(BuildError, match="quantized ONNX"):
            check_tensorrt_available(precision)
    with pytest.raises(BuildError, match="fp16, bf16"):
        check_tensorrt_available("fp32")


def test_tiny_model_refuses_unknown_architectures(tmp_path):
    from deepseek_builder.tiny import TinyModelError, write_tiny_model

    with pytest.raises(TinyModelError, match="choose one of deepseek_v3"):
        write_tiny_model(tmp_path, arch="gpt2")


def test_numerical_check_fails_over_the_precision_threshold_and_names_it():
    from deepseek_builder.check import _verdict
    from deepseek_builder.errors import BuildError

    assert _verdict(1e-5, "fp32", [], "x")["passed"]
    with pytest.raises(BuildError, match=r"differs by 0\.001 \(relative\), more than the fp32 threshold 0\.0001"):
        _verdict(1e-3, "fp32", [{"case": "prefill [3]"}], "differs")
