"""write_repository and the `repository` command: which models, which configs, where the engine files go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepseek_model_repository import RepositoryError, write_repository
from deepseek_model_repository.cli import repository
from deepseek_model_repository.config import parse_pbtxt
from deepseek_model_repository.serving.scheduler import DEFAULT_PREFILL_TOKENS
from deepseek_model_repository.serving.limits import RELAY_THREADS

KV = {
    "num_layers": 1,
    "past_inputs": ["past_key_values.0.key", "past_key_values.0.value"],
    "present_outputs": ["present.0.key", "present.0.value"],
}


def model_info(task: str = "text-generation", backend: str = "onnxruntime") -> dict:
    """A model-info.json as ENGINE_FORMAT.md describes it."""
    inputs = [
        {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]},
        {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1]},
    ]
    outputs = [{"name": "logits", "data_type": "TYPE_FP32", "dims": [-1]}]
    info = {
        "format": 2,
        "task": task,
        "backend": backend,
        "precision": "fp32",
        "architecture": "deepseek_v3",
        "engine_file": "engine/model.plan" if backend == "tensorrt" else "engine/model.onnx",
        "max_batch_size": 8,
        "max_sequence_length": 256,
        "inputs": inputs,
        "outputs": outputs,
        "tokenizer_dir": "tokenizer",
        "bos_token_id": 0,
        "eos_token_ids": [1],
        "pad_token_id": 1,
    }
    if task == "text-generation":
        info["inputs"] = [{"name": n, "data_type": "TYPE_INT64", "dims": [-1]}
                          for n in ("input_ids", "position_ids", "token_mask")]
        info["inputs"] += [{"name": "cache_lengths", "data_type": "TYPE_INT64", "dims": []}] + [
            {"name": n, "data_type": "TYPE_FP32", "dims": [2, -1, 8]} for n in KV["past_inputs"]
        ]
        info["outputs"] += [{"name": n, "data_type": "TYPE_FP32", "dims": [2, -1, 8]} for n in KV["present_outputs"]]
        info["kv_cache"] = KV
    if task == "text-classification":
        info["labels"] = ["NEGATIVE", "POSITIVE"]
    if task == "feature-extraction":
        info["outputs"] = [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [64]}]
    return info


def engine_dir(root: Path, **kw) -> Path:
    """An engine directory with model-info.json and a placeholder engine file (configs only; nothing loads it)."""
    info = model_info(**kw)
    d = root / "engines" / "k1"
    (d / "engine").mkdir(parents=True)
    (d / info["engine_file"]).write_bytes(b"engine bytes")
    if info["backend"] == "onnxruntime":
        (d / "engine" / "model.onnx.data").write_bytes(b"weights")
    (d / "model-info.json").write_text(json.dumps(info))
    return d


def configs(repo: Path) -> dict:
    return {p.parent.name: parse_pbtxt(p.read_text()) for p in repo.glob("*/config.pbtxt")}


def test_text_generation_is_a_relay_and_a_scheduler_that_owns_the_engine(tmp_path):
    """No engine model: the scheduler model runs the engine in its own process; NAME relays to it."""
    engine = engine_dir(tmp_path)
    repo = write_repository(engine, tmp_path / "repo", "chat", runtime="triton", preferred_batch_sizes=[4, 8],
                            max_queue_delay_us=300)
    c = configs(repo)
    assert set(c) == {"chat", "chat_stream"}
    assert not c["chat"].model_transaction_policy.decoupled
    assert c["chat_stream"].model_transaction_policy.decoupled
    for name in ("chat", "chat_stream"):
        assert [i.name for i in c[name].input] == [
            "text_input", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stop", "min_tokens",
            "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty", "return_finish_reason",
            "return_num_input_tokens", "return_num_output_tokens", "return_cumulative_logprob"]
        assert [i.optional for i in c[name].input] == [False] + [True] * 16
        assert [list(i.dims) for i in c[name].input] == [[1]] * 7 + [[-1]] + [[1]] * 9  # any number of stop strings
        assert [o.name for o in c[name].output] == ["text_output", "finish_reason", "num_input_tokens",
                                                    "num_output_tokens", "cumulative_logprob"]
        # Triton's queue only hands requests to the scheduler: the delay applies, once, preferred sizes do not.
        assert c[name].dynamic_batching.max_queue_delay_microseconds == (300 if name == "chat_stream" else 0)
        assert list(c[name].dynamic_batching.preferred_batch_size) == []
        assert c[name].max_batch_size == 8
    assert c["chat"].parameters["scheduler_model"].string_value == "chat_stream"
    assert c["chat_stream"].parameters["engine_dir"].string_value == str(engine.resolve())
    assert c["chat_stream"].parameters["client_model"].string_value == "chat"
    assert c["chat_stream"].parameters["device"].string_value == "cpu"
    assert c["chat_stream"].parameters["stream_interval"].string_value == "1"
    assert (repo / "chat_stream" / "1" / "model.py").read_text().startswith('"""Text generation: the scheduler')
    assert (repo / "chat" / "1" / "model.py").read_text().startswith('"""The client-facing text-generation model')


def test_text_generation_on_gpus_runs_the_scheduler_on_cuda(tmp_path):
    repo = write_repository(engine_dir(tmp_path, backend="tensorrt"), tmp_path / "repo", "m", runtime="triton", gpus=1)
    c = configs(repo)
    assert set(c) == {"m", "m_stream"}
    assert c["m_stream"].parameters["device"].string_value == "cuda"


def test_classifier_for_triton_links_the_onnx_engine_under_the_native_backend(tmp_path):
    engine = engine_dir(tmp_path, task="text-classification")
    repo = write_repository(engine, tmp_path / "repo", "cls", runtime="triton", preferred_batch_sizes=[4, 8])
    c = configs(repo)
    assert set(c) == {"cls", "cls_engine"}
    assert c["cls_engine"].platform == "onnxruntime_onnx"
    assert c["cls_engine"].max_batch_size == 8
    linked = repo / "cls_engine" / "1" / "model.onnx"
    assert linked.is_symlink() and linked.resolve() == (engine / "engine" / "model.onnx").resolve()
    assert (repo / "cls_engine" / "1" / "model.onnx.data").is_symlink()
    assert list(c["cls"].dynamic_batching.preferred_batch_size) == [4, 8]


def test_local_runtime_runs_the_engine_in_a_python_model(tmp_path):
    repo = write_repository(engine_dir(tmp_path, task="feature-extraction"), tmp_path / "repo", "m", runtime="local")
    c = configs(repo)
    assert c["m_engine"].backend == "python"
    assert c["m_engine"].parameters["engine_file"].string_value == "engine/model.onnx"
    assert "onnxruntime.InferenceSession" in (repo / "m_engine" / "1" / "model.py").read_text()


def test_tensorrt_engine_goes_to_gpu_instances(tmp_path):
    repo = write_repository(engine_dir(tmp_path, backend="tensorrt", task="feature-extraction"), tmp_path / "repo", "m",
                            runtime="triton", gpus=1, instance_count=2)
    c = configs(repo)["m_engine"]
    assert c.platform == "tensorrt_plan"
    assert c.instance_group[0].kind == c.instance_group[0].KIND_GPU and c.instance_group[0].count == 2
    assert (repo / "m_engine" / "1" / "model.plan").is_symlink()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime": "local"}, "set spec.engine.backend: onnxruntime"),
        ({"runtime": "triton", "gpus": 0}, "needs a GPU"),
    ],
)
def test_tensorrt_refused_where_it_cannot_run(tmp_path, kwargs, message):
    with pytest.raises(RepositoryError, match=message):
        write_repository(engine_dir(tmp_path, backend="tensorrt"), tmp_path / "repo", "m", **kwargs)


def test_classification_and_extraction_outputs(tmp_path):
    c = configs(write_repository(engine_dir(tmp_path / "a", task="text-classification"), tmp_path / "r1", "cls",
                                 runtime="local"))
    assert set(c) == {"cls", "cls_engine"}
    assert [(o.name, list(o.dims)) for o in c["cls"].output] == [("label", [1]), ("probabilities", [2])]
    assert [i.name for i in c["cls"].input] == ["text_input"]
    c = configs(write_repository(engine_dir(tmp_path / "b", task="feature-extraction"), tmp_path / "r2", "emb",
                                 runtime="local"))
    assert [o.name for o in c["emb"].output] == ["embedding"]


def test_dynamic_batching_off(tmp_path):
    c = configs(write_repository(engine_dir(tmp_path), tmp_path / "repo", "m", runtime="local", dynamic_batching=False))
    assert not any(m.HasField("dynamic_batching") for m in c.values())


def test_without_a_queue_delay_text_generation_hands_requests_over_at_once_and_other_tasks_wait_1000_us(tmp_path):
    """The scheduler batches in flight by itself, so Triton's queue holds text generation's requests for nothing;
    the dynamic batcher of classification and embeddings keeps its default wait for a larger batch."""
    chat = write_repository(engine_dir(tmp_path / "chat"), tmp_path / "chat-repo", "chat", runtime="triton")
    assert {name: c.dynamic_batching.max_queue_delay_microseconds for name, c in configs(chat).items()} == {
        "chat": 0, "chat_stream": 0}
    cls = write_repository(engine_dir(tmp_path / "cls", task="text-classification"), tmp_path / "cls-repo", "cls",
                           runtime="triton")
    assert configs(cls)["cls"].dynamic_batching.max_queue_delay_microseconds == 1000


def test_rewriting_replaces_own_models_and_keeps_others(tmp_path):
    engine = engine_dir(tmp_path)
    repo = tmp_path / "repo"
    write_repository(engine, repo, "a", runtime="local", max_queue_delay_us=100)
    write_repository(engine, repo, "b", runtime="local")
    write_repository(engine, repo, "a", runtime="local", max_queue_delay_us=500)
    c = configs(repo)
    assert set(c) == {"a", "a_stream", "b", "b_stream"}
    assert c["a_stream"].dynamic_batching.max_queue_delay_microseconds == 500
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda i: i.update(format=1), "format 1 is not supported \\(expected 2\\): rebuild the engine"),
        (lambda i: i.pop("kv_cache"), "kv_cache is missing"),
        (lambda i: i.update(task="translation"), "task: Input should be 'text-generation'"),
    ],
)
def test_bad_model_info_names_the_problem(tmp_path, mutate, message):
    engine = engine_dir(tmp_path)
    info = json.loads((engine / "model-info.json").read_text())
    mutate(info)
    (engine / "model-info.json").write_text(json.dumps(info))
    with pytest.raises(RepositoryError, match=message):
        write_repository(engine, tmp_path / "repo", "m", runtime="triton")


def test_preferred_batch_size_above_engine_max_is_refused(tmp_path):
    with pytest.raises(RepositoryError, match=r"between 1 and the engine's max batch size \(8\)"):
        write_repository(engine_dir(tmp_path), tmp_path / "repo", "m", runtime="triton", preferred_batch_sizes=[16])


def cli_repository(engine, output, *flags):
    """`deepseek-operator repository` for model m of ``engine`` into ``output``, with ``flags``."""
    return CliRunner().invoke(repository, ["--engine-dir", str(engine), "--output", str(output), "--model-name", "m",
                                           *flags])


def test_a_prefill_chunk_goes_to_the_scheduler_model_and_below_one_token_is_refused(tmp_path):
    engine = engine_dir(tmp_path)
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton"))
    assert int(c["m_stream"].parameters["prefill_chunk_tokens"].string_value) == DEFAULT_PREFILL_TOKENS
    with pytest.raises(RepositoryError, match="prefill chunk of 0 tokens must be at least 1"):
        write_repository(engine, tmp_path / "repo2", "m", runtime="triton", prefill_chunk_tokens=0)
    result = cli_repository(engine, tmp_path / "repo3", "--prefill-chunk-tokens", "256")
    assert result.exit_code == 0, result.output
    assert configs(tmp_path / "repo3")["m_stream"].parameters["prefill_chunk_tokens"].string_value == "256"
    result = cli_repository(engine, tmp_path / "repo4", "--prefill-chunk-tokens", "0")
    assert result.exit_code != 0 and "--prefill-chunk-tokens" in result.output


def test_the_relay_has_256_threads_unless_told_fewer_and_none_or_more_are_refused(tmp_path):
    engine = engine_dir(tmp_path)
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton"))
    assert c["m"].parameters["relay_threads"].string_value == str(RELAY_THREADS) == "256"
    c = configs(write_repository(engine, tmp_path / "repo1", "m", runtime="triton", relay_threads=2))
    assert c["m"].parameters["relay_threads"].string_value == "2"
    for bad in (0, RELAY_THREADS + 1):
        with pytest.raises(RepositoryError, match=f"relay threads {bad} must be from 1 to 256"):
            write_repository(engine, tmp_path / "repo2", "m", runtime="triton", relay_threads=bad)


def test_prefix_sharing_is_on_unless_turned_off(tmp_path):
    engine = engine_dir(tmp_path)
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton"))
    assert c["m_stream"].parameters["share_prefixes"].string_value == "true"
    result = cli_repository(engine, tmp_path / "repo2", "--no-prefix-sharing")
    assert result.exit_code == 0, result.output
    assert configs(tmp_path / "repo2")["m_stream"].parameters["share_prefixes"].string_value == "false"


def test_a_request_timeout_goes_to_the_scheduler_model_and_below_zero_is_refused(tmp_path):
    engine = engine_dir(tmp_path)
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton"))
    assert float(c["m_stream"].parameters["request_timeout_s"].string_value) == 0  # no limit
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton", request_timeout_s=2.5))
    assert float(c["m_stream"].parameters["request_timeout_s"].string_value) == 2.5
    with pytest.raises(RepositoryError, match="request timeout -1 s must be 0"):
        write_repository(engine, tmp_path / "repo2", "m", runtime="triton", request_timeout_s=-1)
    result = cli_repository(engine, tmp_path / "repo3", "--request-timeout-seconds", "2.5")
    assert result.exit_code == 0, result.output
    assert float(configs(tmp_path / "repo3")["m_stream"].parameters["request_timeout_s"].string_value) == 2.5


def test_a_stream_interval_goes_to_the_scheduler_model_and_below_one_is_refused(tmp_path):
    engine = engine_dir(tmp_path)
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton", stream_interval=4))
    assert c["m_stream"].parameters["stream_interval"].string_value == "4"
    assert "stream_interval" not in c["m"].parameters  # the relay answers plain requests in one response
    with pytest.raises(RepositoryError, match="stream interval 0 must be at least 1 token"):
        write_repository(engine, tmp_path / "repo2", "m", runtime="triton", stream_interval=0)
    result = cli_repository(engine, tmp_path / "repo3", "--stream-interval", "0")
    assert result.exit_code != 0 and "--stream-interval" in result.output


def test_engine_threads_go_to_the_scheduler_model_and_below_zero_is_refused(tmp_path):
    engine = engine_dir(tmp_path)
    c = configs(write_repository(engine, tmp_path / "repo", "m", runtime="triton"))
    assert c["m_stream"].parameters["engine_threads"].string_value == "0"  # the container's CPUs
    c = configs(write_repository(engine, tmp_path / "repo1", "m", runtime="triton", engine_threads=3))
    assert c["m_stream"].parameters["engine_threads"].string_value == "3"
    assert "engine_threads" not in c["m"].parameters
    with pytest.raises(RepositoryError, match=r"engine threads -1 must be 0 \(the container's CPUs\) or more"):
        write_repository(engine, tmp_path / "repo2", "m", runtime="triton", engine_threads=-1)
    result = CliRunner().invoke(repository, ["--engine-dir", str(engine), "--output", str(tmp_path / "repo3"),
                                             "--model-name", "m", "--engine-threads", "5"])
    assert result.exit_code == 0, result.output
    assert configs(tmp_path / "repo3")["m_stream"].parameters["engine_threads"].string_value == "5"


def test_cli_resolves_an_engine_ref(tmp_path):
    from deepseek_contract.integrity import write_manifest

    engine = engine_dir(tmp_path)
    (engine / "build-report.json").write_text("{}")
    write_manifest(engine)  # as the builder does: the init container serves only an entry that matches it
    (tmp_path / "refs").mkdir()
    ref = tmp_path / "refs" / "spec.json"
    ref.write_text(json.dumps({"content_key": "k1", "engine_dir": "engines/k1"}))
    result = CliRunner().invoke(
        repository,
        ["--engine-ref", str(ref), "--output", str(tmp_path / "repo"), "--model-name", "m",
         "--preferred-batch-size", "2", "--preferred-batch-size", "4", "--max-queue-delay-us", "300",
         "--stream-interval", "3"],
    )
    assert result.exit_code == 0, result.output
    assert "m, m_stream" in result.output
    c = configs(tmp_path / "repo")
    assert c["m_stream"].dynamic_batching.max_queue_delay_microseconds == 300
    assert c["m_stream"].parameters["stream_interval"].string_value == "3"
    assert c["m_stream"].parameters["engine_dir"].string_value == str(engine.resolve())
    assert engine.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine-ref", "{tmp}/refs/missing.json"], "has the build finished?"),
        (["--engine-dir", "{tmp}/nowhere"], "is {tmp}/nowhere a finished engine directory?"),
        ([], "give exactly one of --engine-dir or --engine-ref"),
    ],
)
def test_cli_errors_are_clear_and_nonzero_without_traceback(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(repository, args + ["--output", str(tmp_path / "r"), "--model-name", "m"])
    assert result.exit_code != 0
    assert message.format(tmp=tmp_path) in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_serving_image_uses_the_triton_release_the_engines_are_built_for():
    from deepseek_contract.versions import TENSORRT_VERSION, TRITON_RELEASE

    dockerfile = (Path(__file__).parents[2] / "Dockerfile.triton").read_text()
    assert f"ARG TRITON_RELEASE={TRITON_RELEASE}\n" in dockerfile
    assert f"ARG TENSORRT_VERSION={TENSORRT_VERSION}\n" in dockerfile
    assert 'numpy<2' in dockerfile and "tokenizers" in dockerfile
    # The scheduler model runs the engine in Triton's Python backend: the serving package and its runtimes.
    assert "pip install --no-deps ." in dockerfile and "onnxruntime-gpu" in dockerfile and "torch==" in dockerfile
    # Both of its TensorRTs (the pip package's and the tensorrt backend's libnvinfer) are checked against the pin.
    assert "python3 -m deepseek_model_repository.image_check" in dockerfile
    for folder in ("contract", "model_repository"):
        assert f"COPY {folder}/ {folder}/" in dockerfile
