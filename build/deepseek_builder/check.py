"""The numerical check: the engine against the PyTorch model on fresh random inputs.

Text generation is checked the way it is served: the engine is driven step by step over a cache
it writes nothing to (the check writes each step's new keys and values in place, as the runners
do), through a batched prefill of prompts of different lengths, decode steps at several cache
fill levels and a multi-token chunk on top of a filled cache.  Every step's logits are compared
with the unmodified transformers model's logits over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BuildError

#: Largest accepted error, as max|engine - torch| / max|torch| over every output, by engine precision.
#: fp32 must match to rounding; fp16/bf16 lose about 3 decimal digits per op; int8 (dynamic, per-tensor
#: weight quantisation) loses more, and is only bounded against gross breakage.
THRESHOLDS = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2, "int8": 0.35, "fp8": 0.35}


@dataclass(frozen=True)
class Case:
    """One batch of random inputs: rows, new tokens, cached tokens, left padding of the last row."""

    batch: int
    new_tokens: int
    past: int
    pad: int

    def label(self) -> str:
        return f"batch={self.batch} new={self.new_tokens} past={self.past} pad={self.pad}"


def cases(task: str, max_batch: int, max_seq: int) -> list[Case]:
    b = max(1, min(3, max_batch))
    return [Case(b, min(7, max_seq), 0, min(3, max_seq - 1)), Case(1, min(5, max_seq), 0, 0)]


def generation_schedule(max_batch: int, max_seq: int) -> tuple[list[int], list[int]]:
    """(prompt length per row, new tokens per later step) of the text-generation check."""
    rows = max(1, min(3, max_batch))
    prompts = [max(1, min(6 - 2 * r, max_seq - 1)) for r in range(rows)]
    room = max_seq - max(prompts)
    steps = [1, 1, 3, 1, 1, 1, 4, 1]  # decode, a chunk, decode at a fuller cache, another chunk, decode
    kept, used = [], 0
    for n in steps:
        if used + n > room:
            break
        kept.append(n)
        used += n
    return prompts, kept


def check_generation(spec, run_engine: Callable[[dict[str, np.ndarray]], list[np.ndarray]], *, precision: str,
                     max_batch: int, max_seq: int, vocab: int, seed: int = 0, device: str = "cpu",
                     engine_kv_dtype=np.float32) -> dict:
    """Drive the text-generation engine step by step and compare every step's logits with transformers'."""
    import torch

    model = spec.wrapper.model
    prompts, steps = generation_schedule(max_batch, max_seq)
    rows = len(prompts)
    total = [p + sum(steps) for p in prompts]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (rows, max(total)), generator=g)
    with torch.no_grad():
        reference = model(input_ids=tokens.to(device)).logits.float().cpu().numpy()  # [rows, S, V]
    capacity = max(total)
    cache = {}
    for i, layout in enumerate(spec.kv):
        cache[f"past_key_values.{i}.key"] = np.zeros((rows, layout.key_heads, capacity, layout.key_dim), engine_kv_dtype)
        cache[f"past_key_values.{i}.value"] = np.zeros((rows, layout.value_heads, capacity, layout.value_dim),
                                                       engine_kv_dtype)
    lengths = np.zeros(rows, dtype=np.int64)
    results, worst = [], 0.0
    for step, counts in enumerate([prompts] + [[n] * rows for n in steps]):
        width = max(counts)
        ids = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        for r, n in enumerate(counts):
            ids[r, :n] = tokens[r, lengths[r]:lengths[r] + n].numpy()
            mask[r, :n] = 1
        feed = {"input_ids": ids, "position_ids": lengths[:, None] + np.arange(width)[None, :], "token_mask": mask,
                "cache_lengths": lengths.copy(), **cache}
        outputs = dict(zip(spec.output_names, run_engine(feed)))
        logits = np.asarray(outputs[spec.output_names[0]], dtype=np.float32)
        expected = np.stack([reference[r, lengths[r] + counts[r] - 1] for r in range(rows)])
        if logits.shape != expected.shape:
            raise BuildError(f"numerical check: logits have shape {logits.shape}, expected {expected.shape}")
        error = relative_error(expected, logits)
        for name in spec.past_names():
            new = np.asarray(outputs[name.replace("past_key_values", "present")])
            for r, n in enumerate(counts):
                cache[name][r, :, lengths[r]:lengths[r] + n] = new[r, :, :n]
        label = f"prefill {counts}" if step == 0 else f"{counts[0]} new on {int(lengths[0])}..{int(lengths[-1])} cached"
        lengths += np.asarray(counts)
        worst = max(worst, error)
        results.append({"case": label, "max_rel_error": error})
    return _verdict(worst, precision, results, "the engine's logits differ from PyTorch's")


def _verdict(worst: float, precision: str, results: list[dict], what: str) -> dict:
    """The report's ``check`` section; BuildError when ``worst`` is over the precision's threshold."""
    threshold = THRESHOLDS[precision]
    if worst > threshold:
        raise BuildError(f"numerical check failed: {what} by {worst:.3g} (relative), more than the {precision} "
                         f"threshold {threshold:g}; details: {results}")
    return {"max_rel_error": worst, "threshold": threshold, "precision": precision, "passed": True, "cases": results}


def relative_error(reference: np.ndarray, got: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    got = got.astype(np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(reference - got).max()) / scale


def check_engine(spec, run_engine: Callable[[dict[str, np.ndarray]], list[np.ndarray]], *, precision: str,
                 max_batch: int, max_seq: int, vocab: int, seed: int = 0, device: str = "cpu",
                 engine_kv_dtype=np.float32) -> dict:
    """Run both on each case; return the report's ``check`` section; raise when over the threshold."""
    import torch

    if spec.task == "text-generation":
        return check_generation(spec, run_engine, precision=precision, max_batch=max_batch, max_seq=max_seq,
                                vocab=vocab, seed=seed, device=device, engine_kv_dtype=engine_kv_dtype)

    from .export import sample_inputs

    g = torch.Generator().manual_seed(seed)
    results = []
    worst = 0.0
    for case in cases(spec.task, max_batch, max_seq):
        pad = case.pad if case.batch > 1 or case.past > 0 else 0
        inputs = sample_inputs(spec, case.batch, case.new_tokens, case.past, vocab, pad=pad, generator=g,
                               device=device)
        with torch.no_grad():
            reference = spec.wrapper(*[inputs[n] for n in spec.input_names])
        if not isinstance(reference, tuple):
            reference = (reference,)
        feed = {}
        for name, tensor in inputs.items():
            array = tensor.detach().float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
            if tensor.is_floating_point():
                array = array.astype(engine_kv_dtype)
            feed[name] = array
        outputs = run_engine(feed)
        errors = {}
        for name, ref, got in zip(spec.output_names, reference, outputs):
            ref = ref.detach().float().cpu().numpy()
            got = np.asarray(got)
            if got.shape != ref.shape:
                raise BuildError(f"numerical check: output {name} has shape {got.shape}, expected {ref.shape} "
                                 f"({case.label()})")
            errors[name] = relative_error(ref, got.astype(np.float32))
        case_error = max(errors.values())
        worst = max(worst, case_error)
        results.append({"case": case.label(), "max_rel_error": case_error,
                        "worst_output": max(errors, key=errors.get)})
    return _verdict(worst, precision, results, "the engine differs from PyTorch")


def ort_runner(model_file: Path, output_names: list[str], threads: int = 0):
    """A function running the ONNX file with ONNX Runtime on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(output_names, feed)

    return run
