"""The scheduler and its device-resident KV cache on a real NVIDIA GPU.

* PyTorch runner (needs torch with CUDA only): greedy completions of mixed concurrent sequences equal
  transformers' on the same GPU, and the cache stays on the device, allocated once.
* ONNX Runtime's CUDA provider (needs onnxruntime-gpu) and TensorRT (needs tensorrt): the same runner
  interface over device buffers.

Run with scripts/gpu-tests.sh; each test is skipped here with the reason when its runtime is missing.
"""

from __future__ import annotations

import importlib.util
import json
import random
import threading
from pathlib import Path

import pytest


def _cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    return True, ""


CUDA, WHY = _cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not CUDA, reason=WHY or "cuda")]

SLOTS = 4
CAPACITY = 128


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-serving")


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen2"])
def tiny(request, ws) -> tuple[str, Path]:
    from deepseek_builder.tiny import write_tiny_model

    return request.param, write_tiny_model(ws / f"tiny-{request.param}", arch=request.param, seed=3)


def jobs(seed: int, n: int = 12) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 2000) for _ in range(rng.randint(1, 20))], rng.randint(1, 24)) for _ in range(n)]


def serve(runner, work: list[tuple[list[int], int]], max_prefill_tokens=None) -> list[list[int]]:
    from deepseek_model_repository.serving.scheduler import Sampling, Scheduler, Sequence

    scheduler = Scheduler(runner, eos_ids=[1], max_prefill_tokens=max_prefill_tokens).start()
    results: list = [None] * len(work)
    done = threading.Semaphore(0)

    def finisher(i):
        def on_finish(seq, error):
            results[i] = error or list(seq.generated)
            done.release()
        return on_finish

    try:
        for i, (prompt, max_tokens) in enumerate(work):
            scheduler.submit(Sequence(prompt, Sampling(max_tokens=max_tokens), on_finish=finisher(i)))
        for _ in work:
            assert done.acquire(timeout=120)
    finally:
        scheduler.stop()
    return results


def greedy(model, prompt, max_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=1, pad_token_id=1)
    ids = out[0, len(prompt):].tolist()
    return ids[:-1] if ids and ids[-1] == 1 else ids


def test_pytorch_runner_on_cuda_equals_transformers_with_the_cache_on_the_device(tiny):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_model_repository.serving.runners import TorchRunner

    arch, path = tiny
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    runner = TorchRunner(model, SLOTS, CAPACITY)
    tensors = [t for layer in runner.cache.layers for t in layer]
    assert all(t.device.type == "cuda" for t in tensors)
    pointers = [t.data_ptr() for t in tensors]
    work = jobs(len(arch))
    want = [greedy(model, p, m) for p, m in work]
    assert serve(runner, work) == want
    assert serve(runner, work, max_prefill_tokens=4) == want, "prompts prefilled in chunks of 4 on the device"
    assert pointers == [t.data_ptr() for layer in runner.cache.layers for t in layer], "allocated once"
    # The logits stay on the GPU: greedy rows take their argmax there.
    runner.cache.lengths[:] = 0
    logits = runner.forward(0, np.array([[5, 6, 7]], np.int64), np.ones((1, 3), np.int64))
    assert logits.data.device.type == "cuda"


def _engine(ws: Path, source: Path, backend: str, precision: str) -> Path:
    from deepseek_builder import api as builder
    from deepseek_contract.engine import EngineInputs, default_toolchain

    inputs = EngineInputs(source=f"file://{source}", revision=None, task="text-generation", backend=backend,
                          precision=precision, max_batch_size=SLOTS, max_sequence_length=CAPACITY,
                          gpu_type="any-gpu" if backend == "tensorrt" else "cpu",
                          toolchain=default_toolchain(backend, precision))
    return Path(builder.build(builder.BuildRequest(inputs=inputs, cache_dir=ws / "cache")).engine_dir)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_onnxruntime_cuda_runner_equals_transformers(tiny, ws):
    import numpy as np
    import onnxruntime
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_model_repository.serving.runners import open_runner

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    arch, path = tiny
    engine = _engine(ws, path, "onnxruntime", "fp32")
    runner = open_runner(engine, json.loads((engine / "model-info.json").read_text()), SLOTS, CAPACITY,
                         device="cuda:0")
    tensors = [t for layer in runner.cache.layers for t in layer]
    assert all(t.device.type == "cuda" for t in tensors)
    pointers = [t.data_ptr() for t in tensors]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    work = jobs(len(arch) + 1)
    assert serve(runner, work) == [greedy(model, p, m) for p, m in work]
    assert pointers == [t.data_ptr() for layer in runner.cache.layers for t in layer], "allocated once"
    runner.cache.lengths[:] = 0
    logits = runner.forward(0, np.array([[5, 6, 7]], np.int64), np.ones((1, 3), np.int64))
    assert logits.data.device.type == "cuda", "the logits stay on the GPU"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="the tensorrt package is not installed (pip install 'deepseek-operator[tensorrt]')")
def test_tensorrt_runner_steps_with_logits_close_to_torch_and_the_cache_on_the_device(tiny, ws):
    """fp16 engine: a two-row prefill and three decode steps, each step's logits within fp16 tolerance of the fp16
    torch model, the cache on the device and allocated once. (The scheduler over it, sequences joining and leaving,
    is the same code as over the other runners; fp16 greedy choices are not compared with torch's, whose near ties
    may go the other way.)"""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_model_repository.serving.runners import TensorRTRunner

    arch, path = tiny
    engine = _engine(ws, path, "tensorrt", "fp16")
    info = json.loads((engine / "model-info.json").read_text())
    runner = TensorRTRunner(engine / info["engine_file"], info, SLOTS, CAPACITY)
    assert all(t.device.type == "cuda" for layer in runner.cache.layers for t in layer)
    pointers = [t.data_ptr() for layer in runner.cache.layers for t in layer]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids = np.zeros((2, 4), np.int64)
    mask = np.zeros((2, 4), np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
        mask[r, :len(p)] = 1
    logits = runner.step(0, ids, mask)
    tokens = [p + [int(logits[r].argmax())] for r, p in enumerate(prompts)]
    for _ in range(3):
        step = runner.step(0, np.array([[t[-1]] for t in tokens], np.int64), np.ones((2, 1), np.int64))
        with torch.no_grad():
            for r, t in enumerate(tokens):
                want = model(torch.tensor([t], device="cuda")).logits[0, -1].float().cpu().numpy()
                assert np.abs(step[r] - want).max() / np.abs(want).max() < 3e-2
        tokens = [t + [int(step[r].argmax())] for r, t in enumerate(tokens)]
    assert pointers == [t.data_ptr() for layer in runner.cache.layers for t in layer], "allocated once"
