"""Engine builds of the tiny models: time per stage, and a cache hit against a cold build.

For each configuration, ``--repeat`` cold builds (each into a fresh cache, so every stage runs) and as
many cache hits (the same inputs again: resolve the source, find the entry, check it against its
manifest, write the ref and the repository).  The check alone (sha256 of every file of the entry against
manifest.json, what every reuse pays) is timed separately and set against the cold build.  Builds run in this process, so the interpreter's start and imports are not counted; one
extra cache hit through the real CLI process (``deepseek-operator build``) shows the cost a user sees.

    python bench/build/run.py                 # all four architectures, fp32 + the v3 fp16/int8 engines
    python bench/build/run.py --repeat 5 --only deepseek_v3

Writes bench/results/build.json (medians and every sample) and prints a table.  The weights are random:
the numbers measure the pipeline, not DeepSeek's real model sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepseek_builder.api import build, default_request
from deepseek_contract.integrity import verify_entry
from deepseek_builder.tiny import write_tiny_model

RESULTS = Path(__file__).resolve().parents[1] / "results" / "build.json"
CONFIGS = [
    ("deepseek_v3", "text-generation", "fp32"),
    ("deepseek_v2", "text-generation", "fp32"),
    ("qwen2", "text-generation", "fp32"),
    ("llama", "text-generation", "fp32"),
    ("deepseek_v3", "text-generation", "fp16"),
    ("deepseek_v3", "text-generation", "int8"),
    ("deepseek_v3", "feature-extraction", "fp32"),
]
STAGES = ("resolve", "download", "load", "export", "check", "engine")


def one_build(model: Path, task: str, precision: str, cache: Path, out: Path):
    request = default_request(source=f"file://{model}", revision=None, task=task, backend="onnxruntime",
                              precision=precision, max_batch_size=8, max_sequence_length=256, adapter_source=None,
                              adapter_revision=None, gpu_type="cpu", cache_dir=str(cache), output_dir=str(out))
    start = time.perf_counter()
    result = build(request, log=lambda _line: None)
    return time.perf_counter() - start, result


def cli_cache_hit(model: Path, task: str, precision: str, cache: Path, out: Path) -> float:
    cmd = [str(Path(sys.executable).parent / "deepseek-operator"), "build", "--source", f"file://{model}",
           "--task", task, "--backend", "onnxruntime", "--precision", precision, "--max-batch-size", "8",
           "--max-seq-len", "256", "--cache-dir", str(cache), "--output", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default=None, help="only this architecture")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmp = Path(tmp)
        for arch, task, precision in CONFIGS:
            if args.only and arch != args.only:
                continue
            model = tmp / f"model-{arch}-{task}"
            if not model.exists():
                write_tiny_model(model, arch=arch, task=task, seed=0)
            cold, hits, checks, stages, report = [], [], [], {s: [] for s in STAGES}, None
            for i in range(args.repeat):
                cache = tmp / f"cache-{arch}-{task}-{precision}-{i}"
                try:
                    seconds, result = one_build(model, task, precision, cache, tmp / "out")
                except Exception as exc:  # noqa: BLE001 - recorded in the results, the other rows still run
                    report = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[-1][:300]}"}
                    break
                cold.append(seconds)
                report = result.report
                for s in STAGES:
                    if s in report["stage_seconds"]:
                        stages[s].append(report["stage_seconds"][s])
                seconds, again = one_build(model, task, precision, cache, tmp / "out")
                assert again.reused, "the second build must be a cache hit"
                hits.append(seconds)
                start = time.perf_counter()
                assert verify_entry(again.engine_dir) is None
                checks.append(time.perf_counter() - start)
            if "error" in report:
                rows.append({"architecture": arch, "task": task, "precision": precision, "backend": "onnxruntime",
                             "error": report["error"]})
                print(f"{arch:12} {task:18} {precision:5} FAILED: {report['error']}", file=sys.stderr, flush=True)
                continue
            cli_hit = cli_cache_hit(model, task, precision, cache, tmp / "out-cli")
            for i in range(args.repeat):
                shutil.rmtree(tmp / f"cache-{arch}-{task}-{precision}-{i}", ignore_errors=True)
            row = {
                "architecture": arch, "task": task, "precision": precision, "backend": "onnxruntime",
                "cold_build_s": statistics.median(cold), "cache_hit_s": statistics.median(hits),
                "cold_over_hit": statistics.median(cold) / statistics.median(hits),
                "cli_cache_hit_s": cli_hit,
                "verify_s": statistics.median(checks),
                "verify_over_cold": statistics.median(checks) / statistics.median(cold),
                "stage_median_s": {s: statistics.median(v) for s, v in stages.items() if v},
                "max_rel_error": report["check"]["max_rel_error"],
                "engine_bytes": report["sizes"]["engine_bytes"], "onnx_bytes": report["sizes"]["onnx_bytes"],
                "parameters": report["parameters"],
                "samples": {"cold_build_s": cold, "cache_hit_s": hits, "verify_s": checks},
            }
            rows.append(row)
            print(f"{arch:12} {task:18} {precision:5} cold {row['cold_build_s']:6.2f}s  hit "
                  f"{row['cache_hit_s']:6.3f}s  x{row['cold_over_hit']:.0f}  check {row['verify_s']:.3f}s "
                  f"({row['verify_over_cold']:.1%} of cold)", file=sys.stderr, flush=True)
    result = {
        "benchmark": "engine build (tiny random models, onnxruntime CPU engines)",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "repeat": args.repeat,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    header = f"{'model':32} {'prec':5} " + " ".join(f"{s[:8]:>8}" for s in STAGES) + \
        f" {'cold':>7} {'hit':>7} {'cold/hit':>8} {'CLI hit':>7} {'check':>7} {'chk/cold':>8} {'rel.err':>8}"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['architecture'] + ' ' + r['task']:32} {r['precision']:5} build failed: {r['error']}")
            continue
        cells = " ".join(f"{r['stage_median_s'].get(s, 0.0):8.2f}" for s in STAGES)
        print(f"{r['architecture'] + ' ' + r['task']:32} {r['precision']:5} {cells} {r['cold_build_s']:7.2f} "
              f"{r['cache_hit_s']:7.3f} {r['cold_over_hit']:8.0f} {r['cli_cache_hit_s']:7.2f} "
              f"{r['verify_s']:7.3f} {r['verify_over_cold']:8.1%} {r['max_rel_error']:8.1e}")
    print(f"(medians of {args.repeat}, seconds; written to {RESULTS})")


if __name__ == "__main__":
    main()
