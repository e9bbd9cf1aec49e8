"""In-flight batching on a real Triton: correct under load, requests join mid-decode, slots come back.

One server serves tiny random-weight engines of the DeepSeek-V3 (MLA + MoE), Qwen2 and Llama
shapes (the R1 distills), each with 4 slots, so 32 clients always overflow the slots and queue.
Every greedy completion must equal transformers' greedy decoding of that prompt alone.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import random
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from deepseek_model_repository.client import (GenerationClient, ServingError, details_of, generation_inputs,
                                              text_of)
from triton_harness import (build, generate_or_error, scheduler_metric, serve_engines, settled_scheduler_metric,
                            tiny_resource)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ARCHS = ("deepseek_v3", "qwen2", "llama")
SLOTS = 4
WORDS = "the of and to in is was for on are with as by at from it an be this have".split()


def model_name(arch: str) -> str:
    return "tiny-" + arch.replace("_", "-")


def post_generate(server, model: str, fields: dict, endpoint: str = "generate") -> tuple[int, str]:
    """Triton's HTTP ``generate`` (or ``generate_stream``) endpoint: (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", f"/v2/models/{model}/{endpoint}", json.dumps(fields).encode(),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def engines(cache_dir) -> dict[str, Path]:
    return {
        model_name(arch): build(tiny_resource(cache_dir, model_name(arch), arch=arch, spec_overrides={
            "engine": {"maxBatchSize": SLOTS}, "serving": {"dynamicBatching": {"preferredBatchSizes": [SLOTS]}}}),
            cache_dir)
        for arch in ARCHS
    }


#: The Qwen2 engine again, served with ``serving.streamInterval`` 3 and ``serving.prefillChunkTokens`` 4.
PACED = "tiny-qwen2-paced"
PACED_INTERVAL = 3
PACED_CHUNK = 4


@pytest.fixture(scope="module")
def server(engines, cache_dir):
    with serve_engines({**engines, PACED: engines["tiny-qwen2"]}, cache_dir, max_queue_delay_us=0,
                       model_options={PACED: {"stream_interval": PACED_INTERVAL,
                                              "prefill_chunk_tokens": PACED_CHUNK}}) as s:
        yield s


def reference(engine_dir: Path, model_dir: Path, jobs: list[tuple[str, int]]) -> list[str]:
    """transformers' greedy completion of each (prompt, max_tokens), prompt by prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(engine_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt, max_tokens in jobs:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def mixed_jobs(seed: int, n: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))), rng.randint(1, 24)) for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_32_concurrent_mixed_requests_equal_transformers_alone(server, engines, cache_dir, arch):
    """Mixed prompt and output lengths, over gRPC and HTTP at once, 32 clients on 4 slots."""
    name = model_name(arch)
    jobs = mixed_jobs(hash(arch) % 1000, 32)
    want = reference(engines[name], cache_dir / "tiny-models" / f"{arch}-text-generation", jobs)

    def call(index: int) -> str:
        prompt, max_tokens = jobs[index]
        if index % 2:
            client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
            try:
                return text_of(client.infer(name, generation_inputs(httpclient, prompt, max_tokens=max_tokens)))
            finally:
                client.close()
        client = GenerationClient(server.endpoints["grpc"], name)
        try:
            if index % 4 == 0:
                return "".join(client.stream(prompt, max_tokens=max_tokens))
            return client.generate(prompt, max_tokens=max_tokens)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, range(len(jobs))))
    assert got == want
    assert settled_scheduler_metric(server, "requests_waiting", name) == 0


def test_a_paced_stream_sends_a_piece_every_interval_with_the_same_text(server):
    """serving.streamInterval 3: the first token's text at once, then a response per 3 tokens; the text is the same
    as one response per token and as the plain request's."""
    prompt, max_tokens = "the " * 10, 30  # a prompt whose greedy run does not end early
    clients = {name: GenerationClient(server.endpoints["grpc"], name) for name in ("tiny-qwen2", PACED)}
    try:
        every = list(clients["tiny-qwen2"].stream(prompt, max_tokens=max_tokens))
        paced = list(clients[PACED].stream(prompt, max_tokens=max_tokens))
        whole = clients[PACED].generate(prompt, max_tokens=max_tokens)
    finally:
        for client in clients.values():
            client.close()
    assert "".join(paced) == "".join(every) == whole
    assert len(every) > 20, every
    # the first token, then one piece per 3 tokens, then what is left with the final response
    assert 3 <= len(paced) <= 2 + (max_tokens - 1) // PACED_INTERVAL, paced


def test_a_prompt_longer_than_the_prefill_chunk_is_prefilled_in_chunks_with_the_same_completions(server, engines,
                                                                                                 cache_dir):
    """serving.prefillChunkTokens 4: each prompt takes a prefill per 4 of its tokens (counted by Triton's metrics),
    and the completions, sent together so that chunks and decode steps interleave, are transformers'."""
    from tokenizers import Tokenizer

    jobs = [("the of and to in is was for on are with as by at from it an be", 10), ("the " * 9, 14)]
    want = reference(engines["tiny-qwen2"], cache_dir / "tiny-models" / "qwen2-text-generation", jobs)
    tokenizer = Tokenizer.from_file(str(engines["tiny-qwen2"] / "tokenizer" / "tokenizer.json"))
    chunks = [-(-len(tokenizer.encode(prompt).ids) // PACED_CHUNK) for prompt, _ in jobs]
    assert min(chunks) >= 3
    before = settled_scheduler_metric(server, "engine_step_seconds_count", PACED, phase="prefill")

    def call(job):
        client = GenerationClient(server.endpoints["grpc"], PACED)
        try:
            return client.generate(job[0], max_tokens=job[1])
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    assert got == want
    prefills = settled_scheduler_metric(server, "engine_step_seconds_count", PACED, phase="prefill") - before
    # Two prompts that arrive together share their prefills (a batch of both rows) while both have chunks left.
    assert max(chunks) <= prefills <= sum(chunks), (prefills, chunks)


def test_a_server_told_to_stop_finishes_every_request_it_holds_streamed_and_beyond_32_relayed(engines, cache_dir):
    """64 requests on 4 slots (56 plain, 8 streamed), all in the scheduler's queue (the Python backend's thread pool, 32 by default,
    once held the rest back in the relay), then SIGTERM, as Kubernetes stops a replica: Triton refuses new requests,
    and every request it already had completes with transformers' text before the server exits.

    Triton counts none of them as in flight (the models answer later through their response senders), so it goes on
    to unload the models at once, and the Python backend waits for their answers within ``--exit-timeout-secs``
    (``serving.drainSeconds`` in a cluster); past it Triton exits without them (measured on 2.51: under load, with the
    local mode's 5 s, the clients of those left got no answer at all). The drain takes some 4 s here unloaded; the
    server is given 120 s, as a cluster gives what drainSeconds says."""
    import os
    import signal

    name = "tiny-qwen2"
    prompts = [("the " * 10, 120), ("the of " * 6, 120), ("and to in " * 3, 120), ("is was " * 5, 120)]
    jobs = prompts * 16  # greedy runs that do not end early, 4 different ones
    want = reference(engines[name], cache_dir / "tiny-models" / "qwen2-text-generation", prompts) * 16
    streamed = [i % 8 == 0 for i in range(len(jobs))]
    with serve_engines({name: engines[name]}, cache_dir, server_name="drain", max_queue_delay_us=0,
                       exit_timeout_s=120) as drained:
        def call(job, stream=False):
            return generate_or_error(drained, name, job[0], job[1], stream)

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(call, job, stream) for job, stream in zip(jobs, streamed)]
            # More plain requests held than the backend's default 32 threads let through, beside the streams.
            enough = 32 + sum(streamed)
            deadline, most = time.monotonic() + 30, 0.0
            while time.monotonic() < deadline and most <= enough and not all(f.done() for f in futures):
                most = max(most, scheduler_metric(drained, "requests_waiting", name) + scheduler_metric(
                    drained, "sequences_running", name))
                time.sleep(0.01)
            assert most > enough, f"at most {most:.0f} of {len(jobs)} requests reached the scheduler at once"
            os.kill(drained.pid, signal.SIGTERM)
            stopped = time.monotonic()
            time.sleep(0.2)
            late = call(("the", 4))
            got = [f.result() for f in futures]
            drained_s = time.monotonic() - stopped
        assert isinstance(late, ServingError) and "unknown model" in str(late)
        assert got == want, f"drained for {drained_s:.1f} s"


def test_a_short_request_joins_a_running_batch_and_returns_first(server):
    """A short request sent while a long one decodes is answered long before the long one ends."""
    name = "tiny-qwen2"
    done: dict[str, float] = {}

    def run(label: str, prompt: str, max_tokens: int) -> None:
        client = GenerationClient(server.endpoints["grpc"], name)
        try:
            # ignore_eos is not a control here: a long run needs a prompt whose greedy run does not end early
            client.generate(prompt, max_tokens=max_tokens)
        finally:
            client.close()
        done[label] = time.monotonic()

    long = threading.Thread(target=run, args=("long", "the " * 10, 240))
    long.start()
    deadline = time.monotonic() + 10
    while scheduler_metric(server, "sequences_running", name) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    run("short", "of and to", 2)
    long.join(60)
    assert done["short"] < done["long"], "the short request waited for the long one"
    assert done["short"] - started < 0.5 * (done["long"] - started)


def test_a_stream_whose_client_goes_away_frees_its_slot(server):
    """While the stream runs, the gauges show its sequence and its cache; once its client goes away, the sequence
    ends as cancelled and both come back to 0."""
    name = "tiny-llama"
    tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
    cancelled = scheduler_metric(server, "sequences_ended_total", name, outcome="cancelled")
    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    first = threading.Event()
    client.start_stream(callback=lambda result, error: first.set())
    client.async_stream_infer(f"{name}_stream", generation_inputs(grpcclient, "the of and", max_tokens=250,
                                                                   stream=True))
    assert first.wait(10)
    deadline = time.monotonic() + 5  # the scheduler publishes once a second while busy
    while scheduler_metric(server, "sequences_running", name) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler_metric(server, "sequences_running", name) == 1
    assert 0 < scheduler_metric(server, "kv_cache_utilization", name) < 1
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 20
    while scheduler_metric(server, "sequences_running", name) > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
    assert scheduler_metric(server, "sequences_running", name) == 0, (
        f"still running after {generated:.0f} tokens; the server's log ends:\n{Path(server.log).read_text()[-3000:]}")
    assert generated < 250, f"the stream ran to its end ({generated:.0f} tokens) after its client went away"
    assert scheduler_metric(server, "sequences_ended_total", name, outcome="cancelled") == cancelled + 1
    assert settled_scheduler_metric(server, "kv_cache_utilization", name) == 0


def test_an_http_stream_whose_client_disconnects_frees_its_slot(server):
    """Triton's HTTP frontend notices a closed connection when it next writes to it, so a ``generate_stream``
    client that disconnects frees its slot at its next piece of text."""
    name = "tiny-llama"
    tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
    cancelled = scheduler_metric(server, "sequences_ended_total", name, outcome="cancelled")
    body = json.dumps({"text_input": "the of and", "max_tokens": 250, "stream": True}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    connection.request("POST", f"/v2/models/{name}_stream/generate_stream", body,
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data:")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20
    while scheduler_metric(server, "sequences_running", name) > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
    assert scheduler_metric(server, "sequences_running", name) == 0
    assert generated < 250, f"the stream ran to its end ({generated:.0f} tokens) after its client disconnected"
    assert scheduler_metric(server, "sequences_ended_total", name, outcome="cancelled") == cancelled + 1
    assert settled_scheduler_metric(server, "kv_cache_utilization", name) == 0


def test_a_plain_request_whose_client_goes_away_frees_its_slot(server):
    """A gRPC request to NAME that gives up (its deadline passes) is dropped from the batch: the relay passes on
    that its client went away."""
    name = "tiny-llama"
    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    prompt, max_tokens = "the of and", 250
    try:
        tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
        client.infer(name, generation_inputs(grpcclient, prompt, max_tokens=max_tokens))
        whole = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
        with pytest.raises(InferenceServerException, match="(?i)deadline"):
            client.infer(name, generation_inputs(grpcclient, prompt, max_tokens=max_tokens), client_timeout=0.05)
        deadline = time.monotonic() + 20
        while scheduler_metric(server, "sequences_running", name) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before - whole
    finally:
        client.close()
    assert scheduler_metric(server, "sequences_running", name) == 0
    assert generated < whole, f"the request ran to its end ({generated:.0f} tokens) after its client went away"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_generation_clients_own_deadline_cancels_the_request_and_frees_its_slot(server, stream):
    """GenerationClient's ``client_timeout_s`` is gRPC's deadline: past it the call raises a ServingError that names
    the setting, and the server drops the sequence rather than finishing it."""
    name = "tiny-llama"
    tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
    client = GenerationClient(server.endpoints["grpc"], name, client_timeout_s=0.05)
    try:
        with pytest.raises(ServingError, match=r"within this client's 0.05 s \(client_timeout_s\)"):
            if stream:
                "".join(client.stream("the of and", max_tokens=250))
            else:
                client.generate("the of and", max_tokens=250)
    finally:
        client.close()
    deadline = time.monotonic() + 20
    while scheduler_metric(server, "sequences_running", name) > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler_metric(server, "sequences_running", name) == 0
    generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
    assert generated < 250, f"the request ran to its end ({generated:.0f} tokens) after its deadline"


def test_a_generation_client_stream_left_early_is_cancelled_and_a_deadline_that_passes_first_says_so(server):
    """GenerationClient.stream cancels a stream that its caller stops reading, or whose wait for a piece runs out,
    so the server frees the slot rather than finishing the completion; and a deadline so short that it passes
    before the request goes out raises the same ServingError as one that passes later (tritonclient raises its own
    'no longer in valid state' there, which a loaded machine hits)."""
    name = "tiny-llama"
    for leave in ("break", "timeout"):
        tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
        client = GenerationClient(server.endpoints["grpc"], name)
        try:
            if leave == "break":
                pieces = client.stream("the of and", max_tokens=250)
                assert next(pieces)
                pieces.close()  # what leaving a for loop over it does, once nothing else holds the generator
            else:
                with pytest.raises(ServingError, match=r"no response for 0.0001 s \(the stream's timeout\)"):
                    "".join(client.stream("the of and", max_tokens=250, timeout=0.0001))
        finally:
            client.close()
        deadline = time.monotonic() + 20
        while scheduler_metric(server, "sequences_running", name) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler_metric(server, "sequences_running", name) == 0, leave
        generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
        assert generated < 250, f"{leave}: the stream ran to its end ({generated:.0f} tokens)"
    client = GenerationClient(server.endpoints["grpc"], name, client_timeout_s=1e-6)
    try:
        for _ in range(5):
            with pytest.raises(ServingError, match=r"within this client's 1e-06 s \(client_timeout_s\)"):
                "".join(client.stream("the of and", max_tokens=4))
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpc-stream", "generate", "generate_stream"])
def test_a_request_whose_own_timeout_passes_gets_an_error_and_frees_its_slot(server, protocol):
    """tritonclient's ``timeout`` (microseconds, sent to the server), or a ``generate`` request's ``timeout`` field,
    bounds a generation: an HTTP client that disconnects is never noticed, so this is what frees its slot."""
    name = "tiny-llama"
    timeout_us, max_tokens = 80_000, 250
    tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
    timed_out = scheduler_metric(server, "sequences_ended_total", name, outcome="timed_out")
    began = time.monotonic()
    if protocol == "http":
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        with pytest.raises(InferenceServerException) as raised:
            client.infer(name, generation_inputs(httpclient, "the of and", max_tokens=max_tokens), timeout=timeout_us)
        message = str(raised.value)
        assert raised.value.status() == "503"
    elif protocol == "grpc":
        client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
        with pytest.raises(InferenceServerException) as raised:
            client.infer(name, generation_inputs(grpcclient, "the of and", max_tokens=max_tokens), timeout=timeout_us)
        message = str(raised.value)
        assert raised.value.status() == "StatusCode.UNAVAILABLE"
    elif protocol == "generate":
        # Triton's generate endpoint answers every error of a model with 400.
        status, message = post_generate(server, name, {"text_input": "the of and", "max_tokens": max_tokens,
                                                        "timeout": timeout_us})
        assert status == 400
    elif protocol == "generate_stream":
        status, message = post_generate(server, f"{name}_stream", {"text_input": "the of and", "stream": True,
                                                                    "max_tokens": max_tokens, "timeout": timeout_us},
                                        endpoint="generate_stream")
        events = [json.loads(line[len("data: "):]) for line in message.splitlines() if line.startswith("data: ")]
        assert status == 200 and "error" in events[-1] and all("error" not in e for e in events[:-1])
        message = events[-1]["error"]
    else:
        client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
        errors, done = [], threading.Event()

        def callback(result, error):
            if error is not None:
                errors.append(error)
                done.set()

        client.start_stream(callback=callback)
        client.async_stream_infer(f"{name}_stream", generation_inputs(grpcclient, "the of and", max_tokens=max_tokens,
                                                                       stream=True), timeout=timeout_us)
        assert done.wait(20), "no error came from a stream whose timeout passed"
        client.stop_stream()
        message = str(errors[0])
    elapsed = time.monotonic() - began
    if protocol in ("http", "grpc", "grpc-stream"):
        client.close()
    generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
    assert "the request's timeout of 80 ms passed after" in message and f"of its {max_tokens} tokens" in message
    assert generated < max_tokens and elapsed < 5
    assert scheduler_metric(server, "sequences_running", name) == 0
    assert scheduler_metric(server, "sequences_ended_total", name, outcome="timed_out") == timed_out + 1


def test_serving_request_timeout_bounds_requests_that_set_none_or_a_longer_one_counting_the_wait_in_the_relay(
        engines, cache_dir):
    """serving.requestTimeoutSeconds (here 80 ms): a plain HTTP request with no timeout of its own is ended by it;
    a request that asks for less gets its own.  A plain request's timeout counts from when the relay took it: one
    that waited for a relay thread (here the relay has one, held by a request for 80 ms) longer than its timeout is
    answered when it reaches the scheduler, before it is admitted, rather than given its whole timeout again."""
    name = "tiny-llama-limited"
    with serve_engines({name: engines["tiny-llama"]}, cache_dir, server_name="limited",
                       request_timeout_s=0.08, relay_threads=1) as limited:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{limited.http_port}")
        try:
            for own, limit in ((None, 80), (10_000_000, 80), (40_000, 40)):
                with pytest.raises(InferenceServerException) as raised:
                    client.infer(name, generation_inputs(httpclient, "the of and", max_tokens=250), timeout=own)
                assert raised.value.status() == "503"
                assert f"the request's timeout of {limit} ms passed" in str(raised.value)
            assert text_of(client.infer(name, generation_inputs(httpclient, "the", max_tokens=2)))
        finally:
            client.close()
        answers: dict = {}

        def send(label, own):
            each = httpclient.InferenceServerClient(f"127.0.0.1:{limited.http_port}")
            try:
                each.infer(name, generation_inputs(httpclient, "the of and", max_tokens=250), timeout=own)
                answers[label] = "no error"
            except InferenceServerException as exc:
                answers[label] = str(exc)
            finally:
                each.close()

        def passed_on() -> int:  # requests the relay has passed on to the scheduler model
            stats = client.get_inference_statistics(f"{name}_stream")["model_stats"][0]
            return int(stats["inference_count"])

        client = httpclient.InferenceServerClient(f"127.0.0.1:{limited.http_port}")
        try:
            before = passed_on()
            first = threading.Thread(target=send, args=("first", None))
            first.start()
            # The second only once the first holds the relay's one thread (a fixed sleep lost that race under load).
            deadline = time.monotonic() + 5
            while passed_on() == before and time.monotonic() < deadline:
                time.sleep(0.001)
        finally:
            client.close()
        send("second", 40_000)
        first.join(30)
        assert "the request's timeout of 80 ms passed after" in answers["first"], answers
        assert "the request's timeout of 40 ms passed before it could be admitted" in answers["second"], answers
        assert settled_scheduler_metric(limited, "sequences_running", name) == 0


def test_a_stop_string_ends_the_completion_before_it_plain_streamed_and_through_generate(server):
    """The greedy completion, cut before the first occurrence of a stop string taken from its middle, whichever way
    it is asked for; the sequence ends there (outcome stop) rather than at max_tokens."""
    name = "tiny-qwen2"
    client = GenerationClient(server.endpoints["grpc"], name)
    try:
        whole = client.generate("the of and to", max_tokens=40)
        middle = len(whole) // 2
        stop = whole[middle:middle + 4]
        expected = whole[:whole.find(stop)]
        assert stop.strip() and len(expected) < len(whole)
        stops_before = scheduler_metric(server, "sequences_ended_total", name, outcome="stop")
        tokens_before = settled_scheduler_metric(server, "generated_tokens_total", name)
        assert client.generate("the of and to", max_tokens=40, stop=[stop, "never in this text \u2603"]) == expected
        assert "".join(client.stream("the of and to", max_tokens=40, stop=[stop])) == expected
    finally:
        client.close()
    status, body = post_generate(server, name, {"text_input": "the of and to", "max_tokens": 40, "stop": [stop]})
    assert status == 200 and json.loads(body)["text_output"] == expected
    generated = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens_before
    assert scheduler_metric(server, "sequences_ended_total", name, outcome="stop") == stops_before + 3
    assert generated < 3 * 40


@pytest.mark.parametrize("stops, message", [
    ([f"s{i}" for i in range(17)], "stop has 17 strings: send at most 16"),
    (["ok", ""], "stop holds an empty string"),
    (["x" * 257], "a stop string is 257 bytes: send stop strings of at most 256"),
])
def test_bad_stop_strings_are_refused_by_name(server, stops, message):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        with pytest.raises(InferenceServerException, match=message) as raised:
            client.infer("tiny-qwen2", generation_inputs(httpclient, "the", max_tokens=4, stop=stops))
        assert raised.value.status() == "400"
    finally:
        client.close()


def test_min_tokens_and_ignore_eos_reach_the_scheduler_by_every_way_in_and_bad_ones_are_refused(server):
    """The controls pass Triton's input checks and the relay over gRPC (plain and streamed) and HTTP generate; the
    tiny model does not reach its end-of-sentence token here, so the text is the plain greedy one (what they do to
    the end-of-sentence token is checked against transformers in tests/integration/test_scheduler.py)."""
    name, prompt = "tiny-qwen2", "the of and to"
    client = GenerationClient(server.endpoints["grpc"], name)
    try:
        whole = client.generate(prompt, max_tokens=20)
        assert client.generate(prompt, max_tokens=20, min_tokens=20, ignore_eos=True) == whole
        assert "".join(client.stream(prompt, max_tokens=20, min_tokens=5, ignore_eos=False)) == whole
        # A stop string in the text's first half ends it there, unless min_tokens holds stop strings back past it
        # (as vLLM's does): then the completion runs on.
        stop = next(whole[i:i + 4] for i in range(len(whole) // 2) if whole[i:i + 4].strip()
                    and whole.count(whole[i:i + 4]) == 1)
        assert len(whole) - whole.find(stop) > 30, "the stop string must end well before the last token's text"
        assert client.generate(prompt, max_tokens=20, stop=[stop]) == whole[:whole.find(stop)]
        assert client.generate(prompt, max_tokens=20, min_tokens=20, stop=[stop]) == whole
        assert "".join(client.stream(prompt, max_tokens=20, min_tokens=20, stop=[stop])) == whole
    finally:
        client.close()
    status, body = post_generate(server, name, {"text_input": prompt, "max_tokens": 20, "min_tokens": 3,
                                                "ignore_eos": True})
    assert status == 200 and json.loads(body)["text_output"] == whole
    for fields, message in (({"max_tokens": 4, "min_tokens": 9}, "min_tokens 9 is more than max_tokens 4"),
                            ({"max_tokens": 4, "min_tokens": -1}, "min_tokens must be 0 or more, got -1")):
        status, body = post_generate(server, name, {"text_input": prompt, **fields})
        assert status == 400 and message in body, body


def test_a_request_that_asks_gets_its_finish_reason_token_counts_and_logprob_plain_streamed_and_through_generate(
        server, engines, cache_dir):
    """return_finish_reason / return_num_input_tokens / return_num_output_tokens / return_cumulative_logprob (the
    inputs of Triton's vLLM backend): "length" at max_tokens and "stop" at a stop string, the prompt's tokens as the
    tokenizer counts them, the completion's log-probability as transformers gives it; nothing extra for a request
    that does not ask."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    name, prompt = "tiny-qwen2", "the of and to"
    prompt_ids = Tokenizer.from_file(str(engines[name] / "tokenizer" / "tokenizer.json")).encode(prompt).ids
    model = AutoModelForCausalLM.from_pretrained(cache_dir / "tiny-models" / "qwen2-text-generation",
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    logprob = sum(float(torch.log_softmax(step[0].double(), -1)[t])
                  for step, t in zip(out.logits, out.sequences[0, len(prompt_ids):]))
    client = GenerationClient(server.endpoints["grpc"], name)
    try:
        whole, details = client.generate_with_details(prompt, max_tokens=12)
        assert whole == client.generate(prompt, max_tokens=12)
        assert details.pop("cumulative_logprob") == pytest.approx(logprob, rel=1e-4)
        assert details == {"finish_reason": "length", "num_input_tokens": len(prompt_ids), "num_output_tokens": 12}
        stop = whole[len(whole) // 2:len(whole) // 2 + 3]
        cut, details = client.generate_with_details(prompt, max_tokens=12, stop=[stop], details=["finish_reason"])
        assert cut == whole[:whole.find(stop)] and details == {"finish_reason": "stop"}
        raw = grpcclient.InferenceServerClient(server.endpoints["grpc"])
        try:
            plain = raw.infer(name, generation_inputs(grpcclient, prompt, max_tokens=12))
            assert [o.name for o in plain.get_response().outputs] == ["text_output"]
            results = []
            raw.start_stream(callback=lambda result, error: results.append(error or result))
            raw.async_stream_infer(f"{name}_stream", generation_inputs(grpcclient, prompt, max_tokens=12, stream=True,
                                                                       details=["num_output_tokens",
                                                                                "finish_reason"]),
                                   enable_empty_final_response=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (
                    results and results[-1].get_response().parameters.get("triton_final_response", None) is not None
                    and results[-1].get_response().parameters["triton_final_response"].bool_param):
                time.sleep(0.01)
            raw.stop_stream()
        finally:
            raw.close()
        counts = [details_of(r)["num_output_tokens"] for r in results]
        assert sum(counts) == 12 and counts[0] == 1  # the tokens each response covers (the first token at once)
        assert "".join(text_of(r) for r in results if r.as_numpy("text_output") is not None) == whole
        assert [details_of(r).get("finish_reason") for r in results] == [None] * (len(results) - 1) + ["length"]
    finally:
        client.close()
    status, body = post_generate(server, name, {"text_input": prompt, "max_tokens": 12, "return_finish_reason": True,
                                                "return_num_output_tokens": True})
    assert status == 200
    answer = json.loads(body)
    assert answer["text_output"] == whole and answer["finish_reason"] == "length"
    assert answer["num_output_tokens"] == 12 and "num_input_tokens" not in answer


def test_a_client_that_names_its_outputs_gets_those_it_asked_for(server):
    """Detail asked for (return_*) but not named among the outputs is left out, plain and streamed, by the models
    themselves: the stub would drop it while it sends, without the GIL. A stream must name text_output."""
    name, prompt = "tiny-qwen2", "the of and to"
    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    try:
        inputs = generation_inputs(grpcclient, prompt, max_tokens=4, details=["num_output_tokens", "finish_reason"])
        plain = client.infer(name, inputs, outputs=[grpcclient.InferRequestedOutput("text_output"),
                                                    grpcclient.InferRequestedOutput("finish_reason")])
        assert sorted(o.name for o in plain.get_response().outputs) == ["finish_reason", "text_output"]
        assert details_of(plain) == {"finish_reason": "length"}
        for outputs, expected in ((["text_output"], ["text_output"]), (["num_output_tokens"], None)):
            results = []
            client.start_stream(callback=lambda result, error: results.append(error or result))
            client.async_stream_infer(f"{name}_stream",
                                      generation_inputs(grpcclient, prompt, max_tokens=4, stream=True,
                                                        details=["num_output_tokens"]),
                                      outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
            client.stop_stream()  # waits for the stream's end
            if expected is None:
                assert len(results) == 1 and isinstance(results[0], InferenceServerException)
                message = results[0].message()
                assert "but not text_output" in message and "request text_output too" in message
            else:
                assert results and all(sorted(o.name for o in r.get_response().outputs) == expected for r in results)
    finally:
        client.close()


def test_a_repetition_penalty_gives_transformers_text_and_bad_penalties_are_refused_by_name(server, engines,
                                                                                            cache_dir):
    """repetition_penalty through HTTP generate and gRPC streams equals transformers' generate with the same penalty;
    out-of-range penalties are refused with 400, naming the field."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, prompt = "tiny-qwen2", "the of the of the of"
    tokenizer = AutoTokenizer.from_pretrained(engines[name] / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(cache_dir / "tiny-models" / "qwen2-text-generation",
                                                 dtype=torch.float32).eval()
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=16, repetition_penalty=1.3)
    want = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    status, body = post_generate(server, name, {"text_input": prompt, "max_tokens": 16, "repetition_penalty": 1.3})
    assert status == 200 and json.loads(body)["text_output"] == want
    client = GenerationClient(server.endpoints["grpc"], name)
    try:
        assert "".join(client.stream(prompt, max_tokens=16, repetition_penalty=1.3)) == want
        assert client.generate(prompt, max_tokens=16) != want  # the penalty changed the completion
    finally:
        client.close()
    for fields, message in (({"repetition_penalty": 0}, "repetition_penalty must be positive"),
                            ({"presence_penalty": 2.5}, "presence_penalty must be between -2 and 2"),
                            ({"frequency_penalty": -3}, "frequency_penalty must be between -2 and 2")):
        status, body = post_generate(server, name, {"text_input": prompt, "max_tokens": 4, **fields})
        assert status == 400 and message in body, body


def test_a_prompt_sent_again_while_the_first_decodes_copies_its_start_and_completes_as_transformers(server, engines,
                                                                                                    cache_dir):
    """The same 20-odd-token prompt twice, the second while the first streams: the second copies all but its last
    prompt token from the first's cache (deepseek_scheduler_prefix_shared_tokens_total), and its text is
    transformers'."""
    from tokenizers import Tokenizer

    name = "tiny-qwen2"
    prompt = " ".join(WORDS)
    ids = Tokenizer.from_file(str(engines[name] / "tokenizer" / "tokenizer.json")).encode(prompt).ids
    assert len(ids) > 17
    [want] = reference(engines[name], cache_dir / "tiny-models" / "qwen2-text-generation", [(prompt, 10)])
    # Under load the first may end before the second is admitted: then the attempt says nothing, and is repeated.
    for _ in range(5):
        before = settled_scheduler_metric(server, "prefix_shared_tokens_total", name)
        streaming, started = GenerationClient(server.endpoints["grpc"], name), threading.Event()

        def first():
            for _ in streaming.stream(prompt, max_tokens=200):
                started.set()

        thread = threading.Thread(target=first)
        thread.start()
        client = GenerationClient(server.endpoints["grpc"], name)
        try:
            assert started.wait(30)
            assert client.generate(prompt, max_tokens=10) == want
            overlapped = thread.is_alive()  # the first still decoded when the second had its answer
        finally:
            thread.join(60)
            client.close()
            streaming.close()
        if overlapped:
            break
    assert overlapped, "the first request ended before the second was admitted, every time"
    assert settled_scheduler_metric(server, "prefix_shared_tokens_total", name) - before == len(ids) - 1


def test_the_readmes_client_example_runs(server, capsys):
    """The README's Python client example, pointed at this server's ports and a served model."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'http.infer("deepseek-tiny"' in example and "127.0.0.1:8001" in example
    example = (example.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}")
               .replace("127.0.0.1:8001", server.endpoints["grpc"]).replace('"deepseek-tiny', '"tiny-qwen2'))
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    # The plain completion, then the stream's pieces, which make the same text, each on a line of its own.
    client = GenerationClient(server.endpoints["grpc"], "tiny-qwen2")
    try:
        whole = client.generate("Hello", max_tokens=16)
    finally:
        client.close()
    assert printed[0] == whole and len(printed) >= 3 and all(printed[1:]), printed
    assert "".join(printed[1:]) == whole


def test_a_burst_of_short_plain_requests_is_answered_and_the_server_stays_up(server):
    """Plain requests end while the relay's watcher asks their clients whether they went away; a sender asked after
    its final response crashes Triton, so the watcher and the final response must take turns."""
    name = "tiny-qwen2"
    until = time.monotonic() + 3.0

    def client_loop(index: int) -> int:
        client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
        answered = 0
        try:
            while time.monotonic() < until:
                result = client.infer(name, generation_inputs(grpcclient, WORDS[index % len(WORDS)], max_tokens=2))
                assert text_of(result)
                answered += 1
        finally:
            client.close()
        return answered

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answered = sum(pool.map(client_loop, range(16)))
    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    try:
        assert client.is_server_live() and client.is_model_ready(name)
    finally:
        client.close()
    assert answered > 100


def test_a_prompt_too_long_for_the_context_is_refused_by_name(server):
    """Refused by the scheduler model behind the relay, and still a bad request (HTTP 400, gRPC INVALID_ARGUMENT)."""
    for module, url, status in ((httpclient, f"127.0.0.1:{server.http_port}", "400"),
                                (grpcclient, server.endpoints["grpc"], "StatusCode.INVALID_ARGUMENT")):
        client = module.InferenceServerClient(url)
        try:
            with pytest.raises(InferenceServerException, match="maxSequenceLength is 256") as raised:
                client.infer("tiny-qwen2", generation_inputs(module, "word " * 300, max_tokens=4))
            assert raised.value.status() == status
        finally:
            client.close()
    status, body = post_generate(server, "tiny-qwen2", {"text_input": "word " * 300, "max_tokens": 4})
    assert status == 400 and "maxSequenceLength is 256" in body


def test_the_bench_client_sends_one_request_after_another_over_one_stream(server):
    """bench/serving's streaming client keeps one gRPC stream per client: each request ends at its own final
    response with the tokens a stream of its own gives, and a refused request raises Triton's message, after
    which the same client goes on."""
    import asyncio
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_serving_run_client",
                                                  Path(__file__).resolve().parents[2] / "bench/serving/run.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(bench)
        jobs = [("the " * 10, 12), ("of and to", 5), ("word " * 300, 4), ("in is was for on", 9)]

        async def run(persistent: bool):
            send, close = bench.triton_sender(server.endpoints["grpc"], "tiny-qwen2_stream", persistent=persistent)
            outcomes = []
            try:
                for prompt, max_tokens in jobs:
                    record = bench.Record(max_tokens)
                    try:
                        await asyncio.wait_for(send(prompt, max_tokens, record), 60)
                        outcomes.append(record.tokens)
                    except RuntimeError as exc:
                        outcomes.append(str(exc))
            finally:
                await close()
            return outcomes

        one_stream, own_streams = asyncio.run(run(True)), asyncio.run(run(False))
    finally:
        sys.modules.pop(spec.name, None)
    assert one_stream == own_streams, (one_stream, own_streams)
    assert [isinstance(o, int) and o > 0 for o in one_stream] == [True, True, False, True], one_stream
    assert "maxSequenceLength is 256" in one_stream[2]


def stub_rss_bytes(server) -> int:
    """Resident memory of the server's Python-backend stubs (the processes that run the models)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"triton_python_backend_stub" not in cmdline:
                continue
            status = (proc / "status").read_text()
            if int(status.split("PPid:")[1].split()[0]) != server.pid:
                continue
            total += int(status.split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server):
    """5 MB texts are refused in well under a second each; the workers' memory stays flat."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=60)
    try:
        before = stub_rss_bytes(server)
        assert before > 0, "the stubs of this server were not found"
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(InferenceServerException, match="bytes; no text over"):
                client.infer("tiny-qwen2", generation_inputs(httpclient, "x " * 2_500_000, max_tokens=4))
            assert time.monotonic() - started < 2.0
        assert stub_rss_bytes(server) - before < 64 << 20
        assert text_of(client.infer("tiny-qwen2", generation_inputs(httpclient, "the", max_tokens=2)))
    finally:
        client.close()


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-qwen2_stream"])
def test_an_unknown_field_is_refused_by_name(server, model):
    status, body = post_generate(server, model, {"text_input": "hi", "max_tokens": 2, "max_new_tokens": 5})
    assert status == 400 and "unknown field(s) max_new_tokens" in body


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-qwen2_stream"])
@pytest.mark.parametrize("timeout", [0, -5, 1.5, "soon", True])
def test_a_generate_timeout_that_is_not_a_whole_number_of_microseconds_is_refused_by_name(server, model, timeout):
    fields = {"text_input": "hi", "max_tokens": 2, "timeout": timeout}
    status, body = post_generate(server, model, fields)
    assert status == 400 and "timeout must be a whole number of microseconds" in body, body


def test_a_generate_timeout_that_does_not_pass_changes_nothing(server):
    status, body = post_generate(server, "tiny-qwen2", {"text_input": "the of", "max_tokens": 6})
    assert status == 200
    assert post_generate(server, "tiny-qwen2", {"text_input": "the of", "max_tokens": 6, "timeout": 60_000_000}) == \
        (200, body)


def test_the_relays_own_parameters_are_refused_from_a_client(server):
    """``deepseek_relay_id`` passes between NAME and NAME_stream only: a client that sends it to NAME is told."""
    fields = {"text_input": "hi", "max_tokens": 2, "deepseek_relay_id": "x"}
    status, body = post_generate(server, "tiny-qwen2", fields)
    assert status == 400 and "unknown field(s) deepseek_relay_id" in body


def test_a_relayed_request_whose_cancel_came_first_ends_at_once_as_cancelled(server):
    """The relay's cancel of a request can reach NAME_stream before the request itself (both are requests the relay
    sends it): the request, when it comes, is answered at once with the CANCELLED error, not generated to its end.
    (This plays the relay, over Triton's HTTP generate: NAME_stream takes the relay's parameters from anyone.)"""
    name = "tiny-qwen2_stream"
    post_generate(server, name, {"text_input": "the", "max_tokens": 1, "deepseek_cancel_relayed": "came-late"})
    fields = {"text_input": "the of and", "max_tokens": 200, "ignore_eos": True}
    began = time.monotonic()
    status, body = post_generate(server, name, {**fields, "deepseek_relay_id": "came-late"})
    assert (status, json.loads(body)) == (400, {"error": "[CANCELLED] the request was cancelled: its client went away"})
    cancelled_s, began = time.monotonic() - began, time.monotonic()
    assert post_generate(server, name, {**fields, "deepseek_relay_id": "another"})[0] == 200
    assert cancelled_s < (time.monotonic() - began) / 2, "the cancelled one was generated"


def test_scheduler_metrics_count_what_was_served(server):
    name = model_name("deepseek_v3")
    tokens = settled_scheduler_metric(server, "generated_tokens_total", name)

    def ended():
        return sum(scheduler_metric(server, "sequences_ended_total", name, outcome=o) for o in ("stop", "length"))

    ended_before = ended()
    queued = scheduler_metric(server, "queue_time_seconds_count", name)
    prompt_tokens = scheduler_metric(server, "prompt_tokens_total", name)
    first_tokens = scheduler_metric(server, "time_to_first_token_seconds_count", name)
    gaps = scheduler_metric(server, "inter_token_latency_seconds_count", name)
    client = GenerationClient(server.endpoints["grpc"], name)
    try:
        text = client.generate("the of", max_tokens=6)
    finally:
        client.close()
    assert text
    made = settled_scheduler_metric(server, "generated_tokens_total", name) - tokens
    assert 1 <= made <= 6
    # One first token, and a gap between each two tokens after it.
    assert scheduler_metric(server, "time_to_first_token_seconds_count", name) == first_tokens + 1
    assert scheduler_metric(server, "inter_token_latency_seconds_count", name) == gaps + made - 1
    assert ended() - ended_before == 1
    assert scheduler_metric(server, "queue_time_seconds_count", name) == queued + 1
    assert scheduler_metric(server, "queue_time_seconds_bucket", name, le="+Inf") == queued + 1
    assert 0 <= scheduler_metric(server, "queue_time_seconds_sum", name) < 60
    assert scheduler_metric(server, "prompt_tokens_total", name) - prompt_tokens >= 2  # "the of"
    assert scheduler_metric(server, "time_to_first_token_seconds_count", name) >= 1
    assert np.isfinite(scheduler_metric(server, "inter_token_latency_seconds_sum", name))
    # Each engine call's time, by phase: at least this request's prefill and its decode steps.
    steps = {(phase, kind): scheduler_metric(server, f"engine_step_seconds_{kind}", name, phase=phase)
             for phase in ("prefill", "decode") for kind in ("count", "sum")}
    assert steps[("prefill", "count")] >= 1 and steps[("decode", "count")] >= 5
    for phase in ("prefill", "decode"):
        assert scheduler_metric(server, "engine_step_seconds_bucket", name, phase=phase, le="+Inf") \
            == steps[(phase, "count")]
        assert 0 < steps[(phase, "sum")] < 60


def signal_and_read_log(server, pid: int, signum: int, marker: str, wait_s: float = 20.0) -> str:
    """Send ``signum`` to process ``pid`` of ``server``; what the server's log gains, once it holds ``marker`` (or
    after ``wait_s``)."""
    import os

    log = Path(server.log)
    before = log.stat().st_size
    os.kill(pid, signum)
    deadline = time.monotonic() + wait_s
    dumped = ""
    while marker not in dumped and time.monotonic() < deadline:
        time.sleep(0.05)
        with log.open("rb") as fh:
            fh.seek(before)
            dumped = fh.read().decode(errors="replace")
    return dumped


def _stubs(server) -> dict[str, int]:
    """Each Python-backend stub of the server, by the model whose model.py it runs."""
    from deepseek_model_repository.serving.processes import children, stub_model

    return {model: pid for pid in children(server.pid) if (model := stub_model(pid))}

def test_a_text_generation_model_prints_its_threads_to_the_log_on_sigusr1_and_keeps_serving(server):
    """What a stuck request waits on: ``kill -USR1`` a scheduler's or a relay's stub (serving/triton.py)."""
    import signal

    name = model_name("qwen2")
    stubs = _stubs(server)
    assert {name, f"{name}_stream"} <= set(stubs), stubs
    # The scheduler's loop in the scheduler model; the relay's client watcher in the relay (its model.py).
    for model, marker in ((f"{name}_stream", "scheduler.py"), (name, f"{name}/1/model.py")):
        dumped = signal_and_read_log(server, stubs[model], signal.SIGUSR1, marker)
        assert "most recent call first" in dumped and marker in dumped, dumped[-2000:]
    client = GenerationClient(server.endpoints["grpc"], name)
    try:
        assert client.generate("the of", max_tokens=4)
    finally:
        client.close()
    assert _stubs(server)[f"{name}_stream"] == stubs[f"{name}_stream"], "the stub went on running"


def test_the_liveness_probe_fails_when_a_models_process_dies_which_triton_still_reports_ready(engines, cache_dir):
    """A stub that crashes (here the scheduler's, then the relay's, sent SIGSEGV) prints every thread's stack to
    Triton's log as it dies; Triton then still reports the model ready and fails each request, so the pods'
    liveness probe (``deepseek_model_repository.probe``) asks the model itself and fails, naming the process."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from deepseek_model_repository.probe import probe_command

    name = "tiny-qwen2-probed"
    with serve_engines({name: engines["tiny-qwen2"]}, cache_dir, server_name="probed", watch_stubs=False) as probed:
        def probe() -> subprocess.CompletedProcess:
            command = [sys.executable, *probe_command(probed.http_port, name)[1:]]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        alive = probe()
        assert alive.returncode == 0, alive.stderr
        stubs = _stubs(probed)
        for dying, marker in ((f"{name}_stream", "scheduler.py"), (name, f"{name}/1/model.py")):
            dumped = signal_and_read_log(probed, stubs[dying], signal.SIGSEGV, marker)
            assert "Fatal Python error: Segmentation fault" in dumped and marker in dumped, dumped[-2000:]
            with urllib.request.urlopen(f"http://127.0.0.1:{probed.http_port}/v2/models/{name}/ready",
                                        timeout=10) as ready:
                assert ready.status == 200  # what an HTTP probe of Triton's health sees
            dead = probe()
            assert dead.returncode == 1
            assert f"model {name} did not answer the liveness ping" in dead.stderr
            assert f"Stub process '{dying}_0_0' is not healthy" in dead.stderr, dead.stderr


def test_plain_requests_held_by_a_scheduler_process_that_died_are_answered_unavailable(engines, cache_dir):
    """Triton never answers the requests that a model's dead process held: the relay pings ``NAME_stream`` while
    it has requests in flight, and once Triton answers that the process died, it answers them itself, UNAVAILABLE
    (retry), naming it; later requests get the same answer at once. (The stub is stopped first, so that the request
    is surely held by it when it dies.)"""
    import os
    import signal

    from deepseek_model_repository.serving.limits import SCHEDULER_CHECK_S

    name = "tiny-qwen2-held"
    with serve_engines({name: engines["tiny-qwen2"]}, cache_dir, server_name="held", watch_stubs=False) as held:
        def send():
            client = grpcclient.InferenceServerClient(held.endpoints["grpc"])
            try:
                client.infer(name, generation_inputs(grpcclient, "the of and", max_tokens=8), client_timeout=120)
            except InferenceServerException as exc:
                return exc, time.monotonic()
            finally:
                client.close()
            return None, time.monotonic()

        stub = _stubs(held)[f"{name}_stream"]
        os.kill(stub, signal.SIGSTOP)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(send) for _ in range(2)]
            time.sleep(1.0)
            assert not any(f.done() for f in waiting)
            os.kill(stub, signal.SIGKILL)
            died = time.monotonic()
            answers = [f.result(timeout=60) for f in waiting]
        for error, at in answers:
            assert error is not None and error.status() == "StatusCode.UNAVAILABLE", error
            assert f"model {name}_stream's process died" in error.message()
            assert f"Stub process '{name}_stream_0_0' is not healthy" in error.message()
            assert "retry the request" in error.message()
            assert at - died < 4 * SCHEDULER_CHECK_S + 10
        later, _ = send()
        assert later.status() == "StatusCode.UNAVAILABLE" and f"model {name}_stream's process died" in later.message()
        status, body = post_generate(held, name, {"text_input": "the of", "max_tokens": 2})
        assert status == 400 and f"model {name}_stream's process died" in body, (status, body)  # generate's code


def test_plain_requests_that_wait_for_a_relay_thread_count_in_the_queue_signal(engines, cache_dir):
    """Beyond the relay's threads (here 1), plain requests wait in the relay, where the scheduler's queue does not see
    them: the relay publishes them in the same series, ``deepseek_scheduler_requests_waiting{waiting_in="relay"}``,
    so that the autoscalers' sum of it counts them; back to 0 once they have gone on."""
    name = "tiny-qwen2-one-relay"
    with serve_engines({name: engines["tiny-qwen2"]}, cache_dir, server_name="one-relay", relay_threads=1) as one:
        def send(max_tokens):
            client = httpclient.InferenceServerClient(f"127.0.0.1:{one.http_port}")
            try:
                return text_of(client.infer(name, generation_inputs(httpclient, "the of and", max_tokens=max_tokens,
                                                                    ignore_eos=True)))
            finally:
                client.close()

        assert scheduler_metric(one, "requests_waiting", name, waiting_in="relay") == 0
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(send, 250)  # holds the relay's one thread
            time.sleep(0.05)
            queued = [pool.submit(send, 4) for _ in range(2)]
            seen, deadline = 0.0, time.monotonic() + 20
            while seen < 2 and time.monotonic() < deadline and not first.done():
                seen = max(seen, scheduler_metric(one, "requests_waiting", name, waiting_in="relay"))
                time.sleep(0.005)
            assert first.result(60) and all(q.result(60) for q in queued)
        assert seen == 2
        assert settled_scheduler_metric(one, "requests_waiting", name, waiting_in="relay") == 0
        assert scheduler_metric(one, "requests_waiting", name) == 0  # the scheduler's own series, beside it
