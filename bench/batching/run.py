"""Dynamic batching, on against off: throughput and p50/p99 latency at concurrency 1, 8 and 32.

One run, one Triton, one engine: the repository holds the model twice, ``NAME``
with the CR's dynamic batching and ``NAME_nobatch`` without (one request per
execution), so both see the same weights, the same server and the same machine.
The load generator is closed-loop over ``tritonclient.grpc.aio``: C clients each
send a request as soon as their previous one returns.

    python bench/batching/run.py                    # the embedded tiny CR (local-tiny.yaml)
    python bench/batching/run.py -f my-model.yaml --seconds 20 --max-tokens 32

Text generation is batched in flight by the model's scheduler since engine format 2, whatever Triton's
dynamic batching says, so for a text-generation CR both rows now go through the scheduler and differ only in
Triton's hand-over; ``bench/serving`` measures in-flight batching against the previous path. The committed
bench/results/batching.json is the run-to-completion measurement the autoscaling bench's service rate came from.

Writes bench/results/batching.json (``service_rate_rps``: the per-replica
requests/s with batching at the highest concurrency, which the autoscaling
engineer reads) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient

from deepseek_model_repository import write_repository
from deepseek_model_repository.client import generation_inputs
from deepseek_model_repository.repository import ModelNames
from deepseek_local import local

RESULTS = Path(__file__).resolve().parents[1] / "results" / "batching.json"
PROMPTS = [
    "The quick brown fox",
    "Explain dynamic batching in one sentence:",
    "DeepSeek on Triton Inference Server",
    "Write a haiku about GPUs",
    "1, 2, 3, 4,",
    "Kubernetes operators reconcile",
    "What is a KV cache?",
    "Hello",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def closed_loop(url: str, model: str, concurrency: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """C clients, each sending its next request when the previous returns, for ``seconds``."""
    client = aioclient.InferenceServerClient(url)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < deadline:
            prompt = PROMPTS[i % len(PROMPTS)]
            i += concurrency
            start = time.perf_counter()
            try:
                await client.infer(model, generation_inputs(aioclient, prompt, max_tokens=max_tokens))
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    await client.close()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(latencies) / elapsed, 3),
        "tokens_per_s": round(len(latencies) * max_tokens / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
    }


def executions(server: local.LocalServer, model: str) -> tuple[int, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/models/{model}/stats") as r:
        stats = json.load(r)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


async def run_all(server, models: dict[str, str], levels: list[int], seconds: float, max_tokens: int) -> list[dict]:
    url = server.endpoints["grpc"]
    rows = []
    for label, model in models.items():
        await closed_loop(url, model, 2, 1.0, max_tokens)  # warm-up: sessions, shared memory, caches
        for concurrency in levels:
            inf0, exe0 = executions(server, model)
            row = await closed_loop(url, model, concurrency, seconds, max_tokens)
            inf1, exe1 = executions(server, model)
            row["dynamic_batching"] = label == "on"
            row["model"] = model
            row["mean_batch"] = round((inf1 - inf0) / max(1, exe1 - exe0), 2)
            rows.append(row)
            print(f"  batching {label:<3} c={concurrency:<3} {row['throughput_rps']:8.2f} req/s  "
                  f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  mean batch {row['mean_batch']}",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--filename", help="DeepSeekModel YAML (default: the embedded tiny CR)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default: the local mode's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    cache_dir = args.cache_dir or local.default_cache_dir()
    resource = local.load_resource(args.filename, cache_dir)
    local.check_runnable(resource)
    engine_dir = local.build_engine(resource, cache_dir, echo=lambda m: print(m, file=sys.stderr))
    batching = resource.spec.serving.dynamic_batching
    delay_us = batching.queue_delay_us(resource.spec.model.task)
    name = resource.name
    server_name = f"{name}-bench"
    repo = local.state_dir(cache_dir) / server_name / "repository"
    models = {"on": name, "off": f"{name}_nobatch"}
    write_repository(engine_dir, repo, models["on"], runtime="local",
                     max_queue_delay_us=delay_us,
                     preferred_batch_sizes=batching.preferred_batch_sizes)
    write_repository(engine_dir, repo, models["off"], runtime="local", dynamic_batching=False)
    ready = [m for model in models.values()
             for m in (ModelNames.of(model).engine, ModelNames.of(model).stream, model) if (repo / m).is_dir()]
    server = local.serve_repository(server_name, repo, cache_dir, models=ready, http_port=0, grpc_port=0,
                                    metrics_port=0)
    try:
        rows = asyncio.run(run_all(server, models, args.concurrency, args.seconds, args.max_tokens))
    finally:
        local.down_name(server_name, cache_dir)

    by = {(r["dynamic_batching"], r["concurrency"]): r for r in rows}
    ratios = {}
    for c in args.concurrency:
        on, off = by[(True, c)], by[(False, c)]
        ratios[str(c)] = {
            "throughput_on_over_off": round(on["throughput_rps"] / off["throughput_rps"], 2),
            "p50_on_over_off": round(on["p50_ms"] / off["p50_ms"], 2),
            "p99_on_over_off": round(on["p99_ms"] / off["p99_ms"], 2),
        }
    top = max(args.concurrency)
    result = {
        "model": name,
        "engine_dir": str(engine_dir),
        "backend": resource.spec.engine.backend,
        "precision": resource.spec.engine.precision,
        "max_batch_size": resource.spec.engine.max_batch_size,
        "max_queue_delay_us": delay_us,
        "preferred_batch_sizes": batching.preferred_batch_sizes,
        "max_tokens": args.max_tokens,
        "seconds_per_level": args.seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": None},
        "results": rows,
        "ratios": ratios,
        # Requests/s one replica sustains with dynamic batching at the highest concurrency measured.
        "service_rate_rps": by[(True, top)]["throughput_rps"],
        "service_rate_concurrency": top,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"{'batching':<9} {'conc':>4} {'req/s':>8} {'tok/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'batch':>6} {'errors':>6}")
    for r in rows:
        print(f"{'on' if r['dynamic_batching'] else 'off':<9} {r['concurrency']:>4} {r['throughput_rps']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['mean_batch']:>6} {r['errors']:>6}")
    print()
    for c, ratio in ratios.items():
        print(f"concurrency {c:>3}: throughput x{ratio['throughput_on_over_off']} with batching, "
              f"p50 x{ratio['p50_on_over_off']}, p99 x{ratio['p99_on_over_off']}")
    print(f"per-replica service rate: {result['service_rate_rps']} req/s (batching on, concurrency {top})")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
