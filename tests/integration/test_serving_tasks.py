"""The served models against torch on the same weights: LoRA-merged generators, a classifier, an embedder.

Five tiny engines (LoRA-merged DeepSeek-V3, Qwen2 and Llama shapes, a classifier, an embedder), built by the
builder into one cache, served from one
repository by one real Triton (the local runtime).  References come from
transformers/peft in this process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from deepseek_model_repository.client import GenerationClient, generation_inputs, text_of
from triton_harness import build, serve_engines, tiny_model, tiny_resource

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # peft's own MoE defaults name modules this small model does not have
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"),
]

TEXTS = ["I loved this film", "Terrible service, never again", "The weather in Paris", "ok"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


#: The R1-Distill shapes beside DeepSeek-V3's, each with a LoRA adapter of its own under load.
DISTILL_ARCHS = ("qwen2", "llama")


def make_adapter(cache_dir: Path, arch: str = "deepseek_v3") -> Path:
    """A LoRA adapter with non-zero random weights on the tiny ``arch`` generator (peft, saved as PEFT writes it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model(cache_dir, arch), dtype=torch.float32)
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                      if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in
                      {"q_proj", "q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}})
    assert targets, "the tiny model has none of the usual LoRA target modules"
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # large enough to change greedy choices
    out = cache_dir / ("adapter" if arch == "deepseek_v3" else f"adapter-{arch}")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(cache_dir) -> Path:
    return make_adapter(cache_dir)


@pytest.fixture(scope="module")
def distill_adapters(cache_dir) -> dict[str, Path]:
    return {arch: make_adapter(cache_dir, arch) for arch in DISTILL_ARCHS}


@pytest.fixture(scope="module")
def engines(cache_dir, adapter_dir, distill_adapters) -> dict[str, Path]:
    return {
        "tiny-lora": build(tiny_resource(cache_dir, "tiny-lora", adapter=adapter_dir), cache_dir),
        **{f"tiny-lora-{arch}": build(tiny_resource(cache_dir, f"tiny-lora-{arch}", arch=arch, adapter=adapter),
                                      cache_dir) for arch, adapter in distill_adapters.items()},
        "tiny-cls": build(tiny_resource(cache_dir, "tiny-cls", task="text-classification"), cache_dir),
        "tiny-emb": build(tiny_resource(cache_dir, "tiny-emb", task="feature-extraction"), cache_dir),
    }


@pytest.fixture(scope="module")
def server(engines, cache_dir):
    with serve_engines(engines, cache_dir, max_queue_delay_us=2000) as s:
        yield s


def tokenizer_of(engine_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine_dir / "tokenizer")


def test_lora_merged_greedy_completions_equal_peft_merged_model(server, engines, cache_dir, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model(cache_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model(cache_dir), dtype=torch.float32).eval()
    tokenizer = tokenizer_of(engines["tiny-lora"])
    client = GenerationClient(server.endpoints["grpc"], "tiny-lora")
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    differs = False
    try:
        for prompt in TEXTS:
            enc = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                ids = merged.generate(**enc, do_sample=False, max_new_tokens=MAX_TOKENS)
                base_ids = plain.generate(**enc, do_sample=False, max_new_tokens=MAX_TOKENS)
            want = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            differs |= not torch.equal(ids, base_ids)
            assert client.generate(prompt, max_tokens=MAX_TOKENS) == want, prompt
            assert text_of(http.infer("tiny-lora", generation_inputs(httpclient, prompt, max_tokens=MAX_TOKENS))) == want
    finally:
        client.close()
        http.close()
    assert differs, "the adapter should change at least one completion, or this test proves nothing"


@pytest.mark.parametrize("arch", ["deepseek_v3", *DISTILL_ARCHS])
def test_lora_merged_completions_under_32_concurrent_mixed_requests(server, engines, cache_dir, adapter_dir,
                                                                    distill_adapters, arch):
    """The LoRA-merged engine in flight: 32 clients, mixed prompts and lengths, each answer as if alone; for the
    DeepSeek-V3 shape (MLA + MoE) and the Qwen2 and Llama shapes of the R1 distills."""
    import concurrent.futures

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name = "tiny-lora" if arch == "deepseek_v3" else f"tiny-lora-{arch}"
    adapter = adapter_dir if arch == "deepseek_v3" else distill_adapters[arch]
    base = AutoModelForCausalLM.from_pretrained(tiny_model(cache_dir, arch), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model(cache_dir, arch), dtype=torch.float32).eval()
    tokenizer = tokenizer_of(engines[name])
    jobs = [(TEXTS[i % len(TEXTS)] + " and" * (i % 5), 2 + (i * 7) % 15) for i in range(32)]
    want = []
    differs = False
    for prompt, max_tokens in jobs:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = merged.generate(**enc, do_sample=False, max_new_tokens=max_tokens)
            differs |= not torch.equal(ids, plain.generate(**enc, do_sample=False, max_new_tokens=max_tokens))
        want.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert differs, "the adapter should change at least one completion, or this test proves nothing"

    def call(job):
        client = GenerationClient(server.endpoints["grpc"], name)
        try:
            return client.generate(job[0], max_tokens=job[1])
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(call, jobs)) == want


def texts_input(module, texts):
    tensor = module.InferInput("text_input", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return [tensor]


def test_classification_labels_and_probabilities_equal_torch(server, engines, cache_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model(cache_dir, task="text-classification"), dtype=torch.float32
    ).eval()
    tokenizer = tokenizer_of(engines["tiny-cls"])
    want_probs, want_labels = [], []
    for text in TEXTS:
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        probs = torch.softmax(logits, -1).numpy()
        want_probs.append(probs)
        want_labels.append(model.config.id2label[int(probs.argmax())])
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        for text, probs, label in zip(TEXTS, want_probs, want_labels):
            result = client.infer("tiny-cls", texts_input(httpclient, [text]))
            np.testing.assert_allclose(result.as_numpy("probabilities")[0], probs, atol=1e-4)
            assert result.as_numpy("label")[0, 0].decode() == label
        # Several texts in one request are left-padded into one engine call and still match.
        result = client.infer("tiny-cls", texts_input(httpclient, TEXTS))
        np.testing.assert_allclose(result.as_numpy("probabilities"), np.stack(want_probs), atol=1e-4)
    finally:
        client.close()


def test_embeddings_equal_torch_mean_pooling(server, engines, cache_dir):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model(cache_dir, task="feature-extraction"), dtype=torch.float32).eval()
    tokenizer = tokenizer_of(engines["tiny-emb"])
    want = []
    for text in TEXTS:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        want.append(hidden.mean(0).numpy())
    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    try:
        got = client.infer("tiny-emb", texts_input(grpcclient, TEXTS)).as_numpy("embedding")
        np.testing.assert_allclose(got, np.stack(want), atol=1e-4, rtol=1e-3)
        with pytest.raises(InferenceServerException, match="text_input is empty"):
            client.infer("tiny-emb", texts_input(grpcclient, [""]))
        single = client.infer("tiny-emb", texts_input(grpcclient, TEXTS[:1])).as_numpy("embedding")
        np.testing.assert_allclose(single[0], want[0], atol=1e-4, rtol=1e-3)
    finally:
        client.close()


def test_local_mode_serves_a_classifier_and_generate_prints_its_label(engines, cache_dir, tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from deepseek_local import local
    from triton_harness import EXAMPLE

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["metadata"]["name"] = "tiny-cls-local"
    raw["spec"]["model"].update(task="text-classification",
                                source=f"file://{tiny_model(cache_dir, task='text-classification')}")
    cr = tmp_path / "cls.yaml"
    cr.write_text(yaml.safe_dump(raw))
    common = ["-f", str(cr), "--cache-dir", str(cache_dir)]
    up = CliRunner().invoke(local.local, ["up", *common, "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"])
    assert up.exit_code == 0, up.output
    assert "_stream" not in up.output
    try:
        out = CliRunner().invoke(local.local, ["generate", *common, TEXTS[0]])
        assert out.exit_code == 0, out.output
        answer = json.loads(out.output)
        assert answer["label"] in ("NEGATIVE", "POSITIVE") and abs(sum(answer["probabilities"]) - 1) < 1e-4
    finally:
        CliRunner().invoke(local.local, ["down", *common])
