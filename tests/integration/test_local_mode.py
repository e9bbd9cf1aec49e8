"""`deepseek-operator local` end to end on the embedded tiny CR, against a real Triton Inference Server.

One server for the module: `local up` with no -f (the tiny random-weight DeepSeek-V3
model made in the cache, built into an fp32 ONNX Runtime engine), then every check
against it: greedy parity with transformers over HTTP and gRPC, streaming, 32
concurrent clients, bad requests, the CLI's status/generate/down.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from deepseek_model_repository.client import GenerationClient, ServingError, generation_inputs, text_of
from deepseek_local import local
from triton_harness import EXAMPLE, generate_or_error, model_stats, settled_scheduler_metric

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NAME = "deepseek-tiny"
PROMPTS = [
    "Hello",
    "The capital of France is",
    "DeepSeek models run on Triton Inference Server with dynamic batching and",
    "1 2 3 4 5",
    "写一首诗",
]
MAX_TOKENS = 12


def invoke(*args: str):
    return CliRunner().invoke(local.local, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def server(cache_dir):
    result = invoke("up", "--cache-dir", str(cache_dir), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    assert result.exit_code == 0, result.output
    state = local.read_state(cache_dir, NAME)
    assert state is not None and f"{NAME} is ready" in result.output
    assert state.endpoints["grpc"] in result.output and state.endpoints["http"] in result.output
    yield state
    invoke("down", "--cache-dir", str(cache_dir))


@pytest.fixture(scope="module")
def reference(cache_dir, server):
    """transformers' greedy completions on the same weights, prompt by prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = cache_dir / "tiny-models" / "deepseek_v3-text-generation"
    tokenizer = AutoTokenizer.from_pretrained(Path(server.engine_dir) / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=MAX_TOKENS)
        out[prompt] = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def http_generate(server, prompt: str, **controls) -> str:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        return text_of(client.infer(NAME, generation_inputs(httpclient, prompt, **controls)))
    finally:
        client.close()


def test_up_builds_the_default_cr_from_the_embedded_tiny_model(server, cache_dir):
    engine = Path(server.engine_dir)
    info = json.loads((engine / "model-info.json").read_text())
    assert info["backend"] == "onnxruntime" and info["task"] == "text-generation"
    assert engine.parent == cache_dir / "engines"
    assert (cache_dir / "tiny-models" / "deepseek_v3-text-generation" / "config.json").exists()


def test_up_drains_for_the_crs_drain_seconds_as_a_cluster_does(server, cache_dir):
    """The CR's serving.drainSeconds is Triton's --exit-timeout-secs here too, and down waits for it."""
    drain = local.load_default_resource(cache_dir).spec.serving.drain_seconds
    assert server.exit_timeout_s == drain
    assert re.search(rf"\|\s*exit_timeout\s*\|\s*{drain}\s*\|", Path(server.log).read_text())


def test_greedy_completions_equal_transformers_over_http_and_grpc(server, reference):
    grpc = GenerationClient(server.endpoints["grpc"], NAME)
    try:
        for prompt in PROMPTS:
            assert http_generate(server, prompt, max_tokens=MAX_TOKENS) == reference[prompt], prompt
            assert grpc.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0) == reference[prompt], prompt
    finally:
        grpc.close()


def test_decoding_reuses_the_kv_cache_one_engine_step_per_token(server):
    """One engine call per new token: a prefill, then decode steps over the cache (parity proves the cache)."""
    before = settled_scheduler_metric(server, "engine_steps_total", NAME)
    tokens = settled_scheduler_metric(server, "generated_tokens_total", NAME)
    http_generate(server, PROMPTS[2], max_tokens=5)
    assert settled_scheduler_metric(server, "engine_steps_total", NAME) - before == 5
    assert settled_scheduler_metric(server, "generated_tokens_total", NAME) - tokens == 5


def test_streaming_yields_the_same_text_piece_by_piece(server, reference):
    client = GenerationClient(server.endpoints["grpc"], NAME)
    try:
        for prompt in PROMPTS[:3]:
            pieces = list(client.stream(prompt, max_tokens=MAX_TOKENS))
            assert "".join(pieces) == reference[prompt]
            assert len(pieces) > 1, "tokens arrive one by one, not as one response"
    finally:
        client.close()


def post_json(server, path: str, body: dict) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def test_http_generate_and_server_sent_event_streaming(server, reference):
    """Triton's generate extension: JSON over HTTP, and token streaming as server-sent events."""
    prompt = PROMPTS[1]
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS}
    assert json.loads(post_json(server, f"/v2/models/{NAME}/generate", body))["text_output"] == reference[prompt]
    events = post_json(server, f"/v2/models/{NAME}_stream/generate_stream", {**body, "stream": True})
    pieces = [json.loads(line[len("data: "):])["text_output"] for line in events.splitlines() if line.startswith("data: ")]
    assert len(pieces) > 1 and "".join(pieces) == reference[prompt]


def test_32_concurrent_clients_get_their_own_correct_answers_in_shared_batches(server, reference):
    before = model_stats(server, NAME)
    steps = settled_scheduler_metric(server, "engine_steps_total", NAME)
    tokens = settled_scheduler_metric(server, "generated_tokens_total", NAME)
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(32)]

    def call(prompt: str) -> str:
        client = GenerationClient(server.endpoints["grpc"], NAME)
        try:
            return client.generate(prompt, max_tokens=MAX_TOKENS)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, jobs))
    assert answers == [reference[p] for p in jobs]
    after = model_stats(server, NAME)
    assert after["inference_count"] - before["inference_count"] == 32
    # 32 requests, 8 slots: sequences share engine steps (far fewer steps than tokens), and the rest queue.
    steps = settled_scheduler_metric(server, "engine_steps_total", NAME) - steps
    tokens = settled_scheduler_metric(server, "generated_tokens_total", NAME) - tokens
    assert steps < tokens / 3, f"{steps} engine steps for {tokens} tokens: sequences should share steps"


def test_sampling_with_top_k_1_or_a_tiny_top_p_is_greedy(server, reference):
    prompt = PROMPTS[2]
    assert http_generate(server, prompt, max_tokens=MAX_TOKENS, temperature=1.5, top_k=1) == reference[prompt]
    assert http_generate(server, prompt, max_tokens=MAX_TOKENS, temperature=1.5, top_p=1e-6) == reference[prompt]


def test_sampling_is_reproducible_with_a_seed(server):
    a = http_generate(server, "Once upon a time", max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = http_generate(server, "Once upon a time", max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a == b
    others = {http_generate(server, "Once upon a time", max_tokens=8, temperature=1.5, seed=s) for s in range(4)}
    assert len(others) > 1, "different seeds should sample different completions"


def _bad_requests(module):
    def tensor(name, datatype, value):
        t = module.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        return t

    return {
        "no text_input": ([tensor("max_tokens", "INT32", np.array([[4]], np.int32))], "text_input"),
        "wrong dtype": ([tensor("text_input", "INT32", np.array([[4]], np.int32))], "expects 'BYTES'"),
        "empty prompt": (generation_inputs(module, ""), "text_input is empty"),
        "too long": (generation_inputs(module, "word " * 400), "maxSequenceLength is 256"),
        "max_tokens 0": (generation_inputs(module, "hi", max_tokens=0), "max_tokens must be at least 1"),
        "negative temperature": (generation_inputs(module, "hi", temperature=-1.0), "temperature must be"),
    }


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clear_errors_and_the_next_request_succeeds(server, reference, protocol):
    module = httpclient if protocol == "http" else grpcclient
    port = server.http_port if protocol == "http" else server.grpc_port
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for case, (inputs, message) in _bad_requests(module).items():
            with pytest.raises(InferenceServerException) as err:
                client.infer(NAME, inputs)
            assert message in err.value.message(), case
            good = text_of(client.infer(NAME, generation_inputs(module, PROMPTS[0], max_tokens=MAX_TOKENS)))
            assert good == reference[PROMPTS[0]], f"after {case}"
    finally:
        client.close()


def test_bad_requests_batched_with_good_ones_fail_alone(server, reference):
    """Bad and good requests arriving together share executions; only the bad ones get errors."""
    jobs = [(PROMPTS[i % len(PROMPTS)], MAX_TOKENS) for i in range(8)] + [("", MAX_TOKENS), ("hi", 0)] * 2

    def call(job):
        return generate_or_error(server, NAME, job[0], job[1])

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(call, jobs))
    for (prompt, max_tokens), answer in zip(jobs, answers):
        if prompt and max_tokens:
            assert answer == reference[prompt]
        else:
            assert isinstance(answer, ServingError)


def test_stream_on_the_unary_model_points_to_the_stream_model(server):
    with pytest.raises(InferenceServerException, match=f"{NAME}_stream"):
        http_generate(server, "hi", stream=True)


@pytest.mark.parametrize("stream", [False, True])
def test_cli_generate_stops_before_a_stop_string(server, cache_dir, reference, stream):
    whole = reference[PROMPTS[1]]
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    args = ["generate", "--cache-dir", str(cache_dir), "--max-tokens", str(MAX_TOKENS), "--stop", stop, PROMPTS[1]]
    result = invoke(*args, *(["--stream"] if stream else []))
    assert result.exit_code == 0 and result.output == whole[:whole.find(stop)] + "\n"


@pytest.mark.parametrize("stream", [False, True])
def test_cli_generate_with_a_timeout_the_request_cannot_meet_says_so(server, cache_dir, stream):
    args = ["generate", "--cache-dir", str(cache_dir), "--max-tokens", "240", "--timeout", "0.001", PROMPTS[1]]
    result = CliRunner().invoke(local.local, args + (["--stream"] if stream else []))
    assert result.exit_code == 1, result.output
    assert "the request's timeout of 1 ms passed" in result.output and "Traceback" not in result.output


def test_cli_generate_status_and_second_up(server, cache_dir, reference):
    result = invoke("generate", "--cache-dir", str(cache_dir), "--max-tokens", str(MAX_TOKENS), PROMPTS[1])
    assert result.exit_code == 0 and result.output == reference[PROMPTS[1]] + "\n"
    result = invoke("generate", "--cache-dir", str(cache_dir), "--max-tokens", str(MAX_TOKENS), "--ignore-eos",
                    "--min-tokens", "2", PROMPTS[1])
    assert result.exit_code == 0 and result.output == reference[PROMPTS[1]] + "\n"  # no end-of-sentence here
    result = invoke("generate", "--cache-dir", str(cache_dir), "--max-tokens", str(MAX_TOKENS), "--stream", PROMPTS[1])
    assert result.exit_code == 0 and result.output == reference[PROMPTS[1]] + "\n"
    result = invoke("status", "--cache-dir", str(cache_dir))
    assert NAME in result.output and "running" in result.output and str(server.grpc_port) in result.output
    result = CliRunner().invoke(local.local, ["up", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 1 and "already running" in result.output and "Traceback" not in result.output
    # The command it says to run names the cache this one was given.
    assert f"run `deepseek-operator local down --cache-dir {cache_dir}` first" in " ".join(result.output.split())


def test_a_model_that_is_not_running_is_told_apart_from_the_one_that_is(server, cache_dir, tmp_path):
    """``generate`` and ``down`` of another CR's model say which models run in this cache, and the command that
    starts the one asked for names its file and cache."""
    raw = yaml.safe_load((local.EXAMPLES_DIR / local.DEFAULT_EXAMPLE).read_text())
    raw["metadata"]["name"] = "other-tiny"
    cr = tmp_path / "other.yaml"
    cr.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(local.local, ["generate", "-f", str(cr), "--cache-dir", str(cache_dir), "hi"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"other-tiny is not running (running in this cache: {NAME};" in output
    assert f"start it with `deepseek-operator local up -f {cr} --cache-dir {cache_dir}`" in output
    result = invoke("down", "-f", str(cr), "--cache-dir", str(cache_dir))
    assert result.exit_code == 0 and f"other-tiny is not running (running in this cache: {NAME};" in result.output
    assert local.server_running(server)


def test_tensorrt_cr_is_refused_with_a_hint(tmp_path):
    cr = tmp_path / "trt.yaml"
    cr.write_text(
        "apiVersion: deepseek.ai/v1alpha1\nkind: DeepSeekModel\nmetadata: {name: trt}\n"
        "spec: {model: {source: hf://org/model}, engine: {backend: tensorrt}}\n"
    )
    result = CliRunner().invoke(local.local, ["up", "-f", str(cr), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "backend: onnxruntime" in result.output and "Traceback" not in result.output


def test_generate_without_a_server_says_how_to_start_one(tmp_path):
    result = CliRunner().invoke(local.local, ["generate", "--cache-dir", str(tmp_path), "hi"])
    assert result.exit_code == 1 and "local up" in result.output


def test_console_script_up_returns_while_the_server_keeps_running(cache_dir, tmp_path, reference):
    """The real `deepseek-operator` process: `up` exits, Triton stays; the cache comes from the environment."""
    import yaml

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["metadata"]["name"] = "tiny-cli"
    raw["spec"]["model"]["source"] = f"file://{cache_dir / 'tiny-models' / 'deepseek_v3-text-generation'}"
    cr = tmp_path / "tiny-cli.yaml"
    cr.write_text(yaml.safe_dump(raw))
    exe = str(Path(sys.executable).parent / "deepseek-operator")
    env = {**os.environ, local.ENV_CACHE: str(cache_dir)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "local", *args], env=env, capture_output=True, text=True, timeout=300)

    ports = [str(local.free_port()) for _ in range(3)]
    up = cli("up", "-f", str(cr), "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2])
    assert up.returncode == 0, up.stderr
    assert "reusing" in up.stderr or "reusing" in up.stdout, "the engine comes from the cache"
    state = local.read_state(cache_dir, "tiny-cli")
    try:
        assert local.pid_alive(state.pid)
        out = cli("generate", "-f", str(cr), "--max-tokens", str(MAX_TOKENS), PROMPTS[1])
        assert out.returncode == 0 and out.stdout == reference[PROMPTS[1]] + "\n"
    finally:
        down = cli("down", "-f", str(cr))
    assert down.returncode == 0 and "stopped tiny-cli" in down.stdout
    assert not local.pid_alive(state.pid)


def test_down_stops_the_server_and_frees_the_ports(server, cache_dir):
    result = invoke("down", "--cache-dir", str(cache_dir))
    assert result.exit_code == 0 and f"stopped {NAME}" in result.output
    assert not local.pid_alive(server.pid)
    assert local.read_state(cache_dir, NAME) is None
    assert "no local models" in invoke("status", "--cache-dir", str(cache_dir)).output
    # Nothing listens on any of its ports any more. (Binding them to prove it would race the suite's other workers:
    # the ports came from the ephemeral range, where any outgoing connection may take one once it is free.)
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
