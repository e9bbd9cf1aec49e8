"""How long one decode step's KV-cache write takes: ``KvCache.write`` against writing row by row.

A decode step stores one new position per running sequence in every layer's keys and values.
``KvCache.write`` does that with one indexed assignment per tensor; the baseline, measured in the
same run, assigns each row's slice on its own (what the runners did before: on a GPU that is one
kernel per row, layer and tensor).  Shapes: 32 rows at 1,023 tokens of context, 2 KV heads of 128
(a Qwen2/R1-Distill 7B layer), 2 and 28 layers, numpy on the CPU and torch on every device torch has here.

    python bench/serving/cache_write.py            # prints a table, writes bench/results/cache_write.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from run import machine_info  # bench/serving/run.py, beside this file

from deepseek_model_repository.serving.runners import KvCache, LayerShape

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cache_write.json"
ROWS, HEADS, DIM = 32, 2, 128


def row_by_row(cache: KvCache, start: int, counts: list[int], new: list) -> None:
    """The baseline: one slice assignment per row, layer and tensor."""
    for i, layer in enumerate(cache.layers):
        for j, tensor in enumerate(layer):
            for r, n in enumerate(counts):
                at = int(cache.lengths[start + r])
                tensor[start + r, :, at:at + n] = new[2 * i + j][r, :, :n]
    cache.lengths[start:start + len(counts)] += counts


def median_ms(write, cache: KvCache, new: list, repeats: int, sync) -> float:
    counts = [1] * ROWS
    samples = []
    for i in range(repeats + 3):
        cache.lengths[:] = cache.capacity - 1
        sync()
        began = time.perf_counter()
        write(cache, 0, counts, new)
        sync()
        if i >= 3:
            samples.append(time.perf_counter() - began)
    return float(np.median(samples)) * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--capacity", type=int, default=1024, help="positions per slot; each step writes the last")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    kinds = [("numpy", "cpu"), ("torch", "cpu")] + [("torch", "cuda")] * torch.cuda.is_available()
    rows = []
    for layers in (2, 28):
        shapes = [LayerShape(HEADS, DIM, HEADS, DIM)] * layers
        for kind, device in kinds:
            if kind == "numpy":
                cache = KvCache(shapes, ROWS, args.capacity, np.float32)
                new = [np.ones((ROWS, HEADS, 1, DIM), np.float32) for _ in range(2 * layers)]
                sync = lambda: None  # noqa: E731
            else:
                cache = KvCache(shapes, ROWS, args.capacity, torch.float16 if device == "cuda" else torch.float32,
                                device, torch_tensors=True)
                new = [torch.ones((ROWS, HEADS, 1, DIM), dtype=cache.dtype, device=device) for _ in range(2 * layers)]
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            indexed = median_ms(KvCache.write, cache, new, args.repeats, sync)
            baseline = median_ms(row_by_row, cache, new, args.repeats, sync)
            rows.append({"layers": layers, "tensors": f"{kind} ({device})", "indexed_ms": round(indexed, 3),
                         "row_by_row_ms": round(baseline, 3), "speedup": round(baseline / indexed, 1)})
    print(f"{'layers':>6}  {'tensors':<14} {'KvCache.write':>14} {'row by row':>11} {'speedup':>8}")
    for r in rows:
        print(f"{r['layers']:>6}  {r['tensors']:<14} {r['indexed_ms']:>11.3f} ms {r['row_by_row_ms']:>8.3f} ms "
              f"{r['speedup']:>7.1f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {**machine_info(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "rows_per_step": ROWS, "kv_heads": HEADS, "head_dim": DIM, "context": args.capacity - 1, "repeats": args.repeats,
        "statistic": "median ms of one decode step's write (one new position per row)", "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
