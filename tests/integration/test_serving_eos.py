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

    with serve_engines({"eos-probe": probe, "no-eos": engine}, cache, server_name="eos") as server:
        url = f"127.0.0.1:{server.grpc_port}"
        completion = GenerationClient(url, "eos-probe").generate(PROMPT, max_tokens=MAX_TOKENS)
        unstopped = GenerationClient(url, "no-eos").generate(PROMPT, max_tokens=MAX_TOKENS)

    assert completion == tokenizer.decode(free_run[:stop_at], skip_special_tokens=True)
    # Same weights without that EOS run on to max_tokens: the stop came from the EOS token.
    assert unstopped == tokenizer.decode(free_run, skip_special_tokens=True)
    assert len(unstopped) > len(completion)
