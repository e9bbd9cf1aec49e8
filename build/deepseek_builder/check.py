"""The numerical check: the engine against the PyTorch model on fresh random inputs."""

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
    if task == "text-generation":
        return [
            Case(b, min(6, max_seq), 0, min(2, max_seq - 1)),  # left-padded prefill
            Case(max(1, min(2, max_batch)), 1, min(5, max_seq - 1), 1),  # one decode step on a non-empty past
            Case(1, min(4, max_seq // 2), min(3, max_seq // 2), 0),  # a chunk on top of a past
        ]
    return [Case(b, min(7, max_seq), 0, min(3, max_seq - 1)), Case(1, min(5, max_seq), 0, 0)]


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

    from .export import sample_inputs

    threshold = THRESHOLDS[precision]
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
    report = {"max_rel_error": worst, "threshold": threshold, "precision": precision, "passed": worst <= threshold,
              "cases": results}
    if worst > threshold:
        raise BuildError(f"numerical check failed: the engine differs from PyTorch by {worst:.3g} (relative), "
                         f"more than the {precision} threshold {threshold:g}; details: {results}")
    return report


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
