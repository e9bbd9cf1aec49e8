"""Decoding stops at the end-of-sentence token, on a real Triton.

A random-weight model never happens to produce its real EOS token, so the test
makes one of its greedy tokens the EOS: it copies the built engine, names that
token in model-info.json's ``eos_token_ids``, and serves the copy.  The served
completion must then equal transformers' ``generate`` with the same
``eos_token_id``, less the EOS itself (``skip_special_tokens`` drops a real one).
"""

from __future__ import annotations

import json
import shutil

import pytest

from deepseek_model_repository.client import GenerationClient
from triton_harness import build, serve_engines, tiny_model, tiny_resource

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

PROMPT = "The capital of France is"
MAX_TOKENS = 10


def test_decoding_stops_at_the_eos_token_and_leaves_it_out(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path_factory.mktemp("eos-cache")
    engine = build(tiny_resource(cache, "eos-probe"), cache)
    tokenizer = AutoTokenizer.from_pretrained(engine / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_model(cache), dtype=torch.float32).eval()
    enc = tokenizer(PROMPT, return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]

    def greedy(**kwargs) -> list[int]:
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_TOKENS, **kwargs)
        return out[0, prompt_len:].tolist()

    free_run = greedy()
    # The first token that has not appeared before becomes the EOS, so the stop is unambiguous.
    stop_at = next(i for i in range(2, len(free_run)) if free_run[i] not in free_run[:i])
    eos = free_run[stop_at]
    stopped = greedy(eos_token_id=eos, pad_token_id=eos)
    assert stopped == free_run[: stop_at + 1]

    probe = tmp_path_factory.mktemp("eos-engine") / "engine"
    shutil.copytree(engine, probe, symlinks=True)
    info_path = probe / "model-info.json"
    info = json.loads(info_path.read_text())
    info["eos_token_ids"] = [eos]
    info_path.write_text(json.dumps(info))
    # And one whose first greedy token is its EOS: an empty completion.
    first = tmp_path_factory.mktemp("eos-first") / "engine"
    shutil.copytree(engine, first, symlinks=True)
    info["eos_token_ids"] = [free_run[0]]
    (first / "model-info.json").write_text(json.dumps(info))

    with serve_engines({"eos-probe": probe, "no-eos": engine, "eos-first": first}, cache,
                       server_name="eos") as server:
        url = f"127.0.0.1:{server.grpc_port}"
        completion = GenerationClient(url, "eos-probe").generate(PROMPT, max_tokens=MAX_TOKENS)
        unstopped = GenerationClient(url, "no-eos").generate(PROMPT, max_tokens=MAX_TOKENS)
        empty = GenerationClient(url, "eos-first").generate(PROMPT, max_tokens=MAX_TOKENS)
        _, counted = GenerationClient(url, "eos-probe").generate_with_details(PROMPT, max_tokens=MAX_TOKENS)
        streams = {(name, empty_final): grpc_stream(url, name, empty_final)
                   for name in ("eos-probe", "no-eos", "eos-first") for empty_final in (False, True)}
        events = {name: generate_stream(server.http_port, name) for name in ("eos-probe", "no-eos", "eos-first")}
        detailed = generate_stream(server.http_port, "eos-probe", return_finish_reason=True,
                                   return_num_output_tokens=True)

    assert completion == tokenizer.decode(free_run[:stop_at], skip_special_tokens=True)
    # Same weights without that EOS run on to max_tokens: the stop came from the EOS token.
    assert unstopped == tokenizer.decode(free_run, skip_special_tokens=True)
    assert len(unstopped) > len(completion)
    # However a stream ends, every client sees its final response, marked final, whether or not it asks for empty
    # final responses: at the EOS token it carries empty text (nothing is left), at max_tokens the last token's text.
    # No response before it is empty.
    for name, whole in (("eos-probe", completion), ("no-eos", unstopped)):
        pieces = streams[name, False]
        assert streams[name, True] == pieces
        assert "".join(t for t, _ in pieces) == whole, pieces
        assert pieces[-1][1] and not any(final for _, final in pieces[:-1]), pieces
        assert all(t for t, _ in pieces[:-1]) and (pieces[-1][0] == "") == (name == "eos-probe"), pieces
        texts = [e["text_output"] for e in events[name]]
        assert "".join(texts) == whole and all(texts[:-1]) and (texts[-1] == "") == (name == "eos-probe"), texts
    # An empty completion still gets one response, with empty text, whichever way it is asked for.
    assert empty == ""
    assert streams["eos-first", False] == streams["eos-first", True] == [("", True)]
    assert [e["text_output"] for e in events["eos-first"]] == [""]
    # Asked for details, a stream that ends at its EOS says how it ended on a final response of its own.
    assert "".join(e["text_output"] for e in detailed) == completion
    assert detailed[-1] == {**detailed[-1], "text_output": "", "finish_reason": "stop"}
    assert all("finish_reason" not in e for e in detailed[:-1])
    # The end-of-sentence token counts as an output token, as vLLM counts it (and as cumulative_logprob sums it),
    # though no text shows it: on the final response that it ends, for a stream.
    assert counted["finish_reason"] == "stop" and counted["num_output_tokens"] == stop_at + 1
    assert sum(e["num_output_tokens"] for e in detailed) == stop_at + 1 and detailed[-1]["num_output_tokens"] == 1


def grpc_stream(url: str, model: str, empty_final: bool) -> list[tuple[object, bool]]:
    """Each response of a gRPC stream of ``model``'s stream model: (its text, or None without one; whether it is
    the request's final response), as a client with or without ``enable_empty_final_response`` gets them."""
    import numpy as np
    import queue
    import tritonclient.grpc as grpcclient

    from deepseek_model_repository.client import generation_inputs

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(f"{model}_stream", generation_inputs(grpcclient, PROMPT, max_tokens=MAX_TOKENS,
                                                                       stream=True),
                                  enable_empty_final_response=empty_final)
    finally:
        client.stop_stream()  # waits for the request's last response
        client.close()
    out = []
    while not responses.empty():
        result, error = responses.get()
        assert error is None, error
        text = result.as_numpy("text_output")
        final = result.get_response().parameters.get("triton_final_response")
        out.append((None if text is None else np.asarray(text).reshape(-1)[0].decode(),
                    bool(final is not None and final.bool_param)))
    return out


def generate_stream(http_port: int, model: str, **fields) -> list[dict]:
    """The events of Triton's HTTP ``generate_stream`` for ``model``'s stream model (``fields``: more of the body)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    try:
        body = json.dumps({"text_input": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, **fields})
        connection.request("POST", f"/v2/models/{model}_stream/generate_stream", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        lines = response.read().decode().splitlines()
    finally:
        connection.close()
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
