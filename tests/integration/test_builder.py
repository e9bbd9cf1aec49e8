"""The builder end to end on a tiny random DeepSeek-V3: CLI, engine, KV cache, numerical check, cache reuse."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deepseek_builder.cli import build, dev
from deepseek_operator.engine_key import spec_key

pytestmark = [pytest.mark.slow]

SEQ = 64


def run_build(*args: str) -> "object":
    return CliRunner().invoke(build, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builder")


@pytest.fixture(scope="module")
def tiny_v3(workspace) -> Path:
    out = workspace / "tiny-v3"
    result = CliRunner().invoke(dev, ["tiny-model", "--out", str(out), "--seed", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output
    return out


@pytest.fixture(scope="module")
def built(workspace, tiny_v3):
    """One fp32 onnxruntime build of the tiny model: (output dir, cache dir, seconds, cli output)."""
    out, cache = workspace / "out", workspace / "cache"
    start = time.monotonic()
    result = run_build("--source", f"file://{tiny_v3}", "--backend", "onnxruntime", "--precision", "fp32",
                       "--max-batch-size", "4", "--max-seq-len", str(SEQ), "--output", str(out),
                       "--cache-dir", str(cache), "--model-name", "tiny")
    assert result.exit_code == 0, result.output
    return out, cache, time.monotonic() - start, result.output


def engine_dir(cache: Path) -> Path:
    (entry,) = list((cache / "engines").iterdir())
    return entry


def test_tiny_model_has_real_tokenizer_and_its_full_vocabulary(tiny_v3):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_v3)
    config = AutoConfig.from_pretrained(tiny_v3)
    assert config.model_type == "deepseek_v3"
    assert config.vocab_size == len(tok) == 129280
    assert config.max_position_embeddings >= 2048
    assert tok.bos_token_id == config.bos_token_id == 0
    assert tok.eos_token_id == config.eos_token_id == 1
    assert tok.decode(tok("Hello world")["input_ids"], skip_special_tokens=True) == "Hello world"


def test_tiny_model_generates_distinct_word_tokens(tiny_v3):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_v3)
    model = AutoModelForCausalLM.from_pretrained(tiny_v3).eval()
    ids = tok("The weather today", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    words = tok.decode(new).split()
    assert len(set(new)) >= 6, tok.decode(new)
    assert sum(w.isalpha() for w in words) >= len(words) // 2, words


def test_build_writes_engine_repository_and_report(built):
    out, cache, _, output = built
    entry = engine_dir(cache)
    for name in ("engine/model.onnx", "tokenizer/tokenizer.json", "model-info.json", "build-report.json"):
        assert (entry / name).is_file(), name
    for model in ("tiny", "tiny_stream"):  # text generation: the relay and the scheduler that runs the engine
        assert (out / model / "config.pbtxt").is_file(), model
    assert not (out / "tiny_engine").exists()
    report = json.loads((out / "build-report.json").read_text())
    assert report["content_key"] == entry.name
    assert report["source_revision"].startswith("sha256:")
    assert set(report["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "tensorrt"}
    assert set(report["stage_seconds"]) >= {"download", "load", "export", "check", "engine"}
    assert report["check"]["max_rel_error"] < 1e-4
    cases = [c["case"] for c in report["check"]["export"]["cases"]]
    # A padded prefill of several prompts, single-token decode steps and multi-token chunks on a filled cache.
    assert cases[0].startswith("prefill [") and any(c.startswith("1 new on") for c in cases)
    assert any(c.startswith(("3 new on", "4 new on")) for c in cases) and len(cases) >= 5
    assert report["sizes"]["engine_bytes"] > 1_000_000
    ref = json.loads((cache / "refs" / f"{report['spec_key']}.json").read_text())
    assert ref["engine_dir"] == f"engines/{entry.name}"
    # Progress is one line per event, stage-named.
    assert "[build] export: started" in output and "[build] check: max relative error" in output


def test_model_info_describes_the_onnx_graph(built):
    import onnx

    _, cache, _, _ = built
    entry = engine_dir(cache)
    info = json.loads((entry / "model-info.json").read_text())
    graph = onnx.load(str(entry / "engine/model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == [i["name"] for i in info["inputs"]]
    assert [o.name for o in graph.output] == [o["name"] for o in info["outputs"]]
    assert info["kv_cache"]["num_layers"] == 2
    assert info["kv_cache"]["past_inputs"][:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert info["eos_token_ids"] == [1] and info["bos_token_id"] == 0
    assert info["outputs"][0] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [129280]}


def test_engine_steps_over_a_cache_written_in_place_equal_torch(built, tiny_v3):
    """Prefill two prompts of different lengths, then decode 3 steps: the engine returns only the new
    positions, the runner writes them into its cache, and every step's logits equal HF's."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_model_repository.serving.runners import open_runner

    _, cache, _, _ = built
    entry = engine_dir(cache)
    info = json.loads((entry / "model-info.json").read_text())
    runner = open_runner(entry, info, slots=2, capacity=SEQ)
    model = AutoModelForCausalLM.from_pretrained(tiny_v3).eval()
    prompts = [[0, 300, 301, 302, 303], [0, 500, 501]]
    width = max(map(len, prompts))
    ids = np.array([p + [1] * (width - len(p)) for p in prompts], dtype=np.int64)
    mask = np.array([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=np.int64)
    logits = runner.step(0, ids, mask)
    sequences = [list(p) for p in prompts]
    for _ in range(4):
        for row, seq in enumerate(sequences):
            with torch.no_grad():
                want = model(torch.tensor([seq])).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[row], want, atol=2e-4, rtol=1e-3)
        nxt = logits.argmax(-1)
        for row, seq in enumerate(sequences):
            seq.append(int(nxt[row]))
        logits = runner.step(0, nxt[:, None].astype(np.int64), np.ones((2, 1), dtype=np.int64))
    assert runner.cache.lengths.tolist() == [len(s) for s in sequences]


def test_second_build_is_a_cache_hit_in_seconds(built, tiny_v3, workspace):
    out, cache, cold, _ = built
    entry = engine_dir(cache)
    before = (entry / "engine/model.onnx").stat().st_mtime_ns
    start = time.monotonic()
    result = run_build("--source", f"file://{tiny_v3}", "--backend", "onnxruntime", "--precision", "fp32",
                       "--max-batch-size", "4", "--max-seq-len", str(SEQ), "--output", str(workspace / "out2"),
                       "--cache-dir", str(cache))
    warm = time.monotonic() - start
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "export: started" not in result.output
    assert (entry / "engine/model.onnx").stat().st_mtime_ns == before
    assert warm < 5 and warm < cold
    assert json.loads((workspace / "out2" / "build-report.json").read_text())["reused_from_cache"] is True


def test_spec_key_of_the_cli_equals_the_operators(built, tiny_v3):
    from deepseek_operator import api as crd

    _, cache, _, _ = built
    report = json.loads((engine_dir(cache) / "build-report.json").read_text())
    resource = crd.parse_resource({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "metadata": {"name": "tiny"},
        "spec": {"model": {"source": f"file://{tiny_v3}", "task": "text-generation"},
                 "engine": {"backend": "onnxruntime", "precision": "fp32", "maxBatchSize": 4,
                            "maxSequenceLength": SEQ},
                 "serving": {"gpusPerReplica": 0}},
    })
    assert spec_key(resource.spec) == report["spec_key"]


def test_resource_build_api_reuses_the_cli_engine(built, tiny_v3):
    """The local mode's entry point finds the engine the CLI built (same inputs, same content key)."""
    from deepseek_local.local import build_engine
    from deepseek_operator import api as crd

    _, cache, _, _ = built
    resource = crd.parse_resource({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "metadata": {"name": "tiny"},
        "spec": {"model": {"source": f"file://{tiny_v3}"},
                 "engine": {"backend": "onnxruntime", "precision": "fp32", "maxBatchSize": 4,
                            "maxSequenceLength": SEQ},
                 "serving": {"gpusPerReplica": 0}},
    })
    lines = []
    assert build_engine(resource, cache, lines.append) == engine_dir(cache)


@pytest.mark.parametrize("damage", ["overwritten", "no-manifest"])
def test_damaged_or_unverifiable_cache_entry_is_rebuilt_with_the_reason(built, tiny_v3, workspace, damage):
    """Weights overwritten in place (same size), or an entry from before manifests: rebuilt, never reused."""
    _, cache, _, _ = built
    entry = engine_dir(cache)
    if damage == "overwritten":
        onnx = entry / "engine" / "model.onnx"
        st = onnx.stat()
        with open(onnx, "r+b") as f:
            f.seek(st.st_size // 2)
            f.write(b"\0" * 64)
        os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))
        reason = "engine/model.onnx has changed since it was built"
    else:
        (entry / "manifest.json").unlink()
        reason = "it has no manifest.json: it was built before engines recorded content hashes"
    result = run_build("--source", f"file://{tiny_v3}", "--backend", "onnxruntime", "--precision", "fp32",
                       "--max-batch-size", "4", "--max-seq-len", str(SEQ), "--output", str(workspace / "out3"),
                       "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert f"fails its integrity check: {reason}" in result.output
    assert "discarding it and rebuilding" in result.output
    assert "export: started" in result.output and "reused" not in result.output
    assert engine_dir(cache) == entry and (entry / "manifest.json").is_file()
    from deepseek_contract.integrity import verify_entry

    assert verify_entry(entry) is None
    assert json.loads((workspace / "out3" / "build-report.json").read_text())["reused_from_cache"] is False


@pytest.mark.parametrize("fault", ["decode position", "stale cache"])
def test_the_numerical_check_fails_an_engine_that_goes_wrong_only_in_decode(built, tiny_v3, workspace, fault):
    """The build's check drives the built engine over a cache at several fill levels: an engine whose prefill is
    right but whose decode steps read their positions one off, or a cache its new positions never reach, fails it,
    and the error names the check and the cases."""
    import torch

    from deepseek_builder import architectures as arch
    from deepseek_builder.check import check_engine, ort_runner
    from deepseek_builder.export import export_spec
    from deepseek_builder.errors import BuildError

    _, cache, _, _ = built
    entry = engine_dir(cache)
    info = json.loads((entry / "model-info.json").read_text())
    torch.manual_seed(0)
    spec = export_spec(arch.load_model(tiny_v3, "text-generation"), "text-generation")
    engine = ort_runner(entry / info["engine_file"], spec.output_names)
    kwargs = dict(precision="fp32", max_batch=4, max_seq=SEQ, vocab=int(info["vocab_size"]))
    assert check_engine(spec, engine, **kwargs)["passed"]  # the engine as built

    def faulty(feed):
        decoding = feed["input_ids"].shape[1] == 1 and feed["cache_lengths"].min() > 0
        if decoding and fault == "decode position":
            feed = {**feed, "position_ids": feed["position_ids"] + 1}
        elif decoding:
            feed = {**feed, **{k: np.zeros_like(v) for k, v in feed.items() if k.startswith("past_key_values")}}
        return engine(feed)

    with pytest.raises(BuildError, match=r"numerical check failed: the engine's logits differ from PyTorch's") as err:
        check_engine(spec, faulty, **kwargs)
    assert "cached" in str(err.value) and "prefill" in str(err.value)
