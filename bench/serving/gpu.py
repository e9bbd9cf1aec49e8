"""The scheduler and its KV cache on a CUDA GPU: the PyTorch runner, no server, models of real shapes.

Random weights in bf16 on the GPU, at the sizes users serve: ``qwen2-7b`` (R1-Distill-Qwen-7B: Qwen2,
28 layers, 4 KV heads of 128) and ``deepseek-v3-16b`` (the DeepSeek-V3 architecture, MLA + MoE, at
DeepSeek-V2-Lite's size: 27 layers, 64 routed experts, 6 per token, a 512-wide latent cache).  Each
measurement has its baseline in the same run:

* **decode step**, 16 sequences at about 50 and about 2,000 tokens of context:
  ``in place`` is ``TorchRunner.forward`` and the greedy argmax (the cache stays on the device; the
  step writes its new positions), and ``of which queueing`` the time until ``forward`` returns, its
  work queued on the device (where the two are close, the host's kernel launches set the pace, not
  the GPU); ``+ host round trip`` is the same step plus what the previous
  run-to-completion loop did to the cache on every token (its engine returned the whole cache, which
  crossed to the host through the Python backend's shared memory and came back); ``transformers`` is
  the model's own decode step over its ``DynamicCache`` (SDPA attention, the cache grown by concatenation).
* **closed-loop mixed-length load** at 1, 8 and 32 clients (bench/serving/run.py's requests: max_tokens
  4 to 96, a third of them short; EOS off, so every request decodes its max_tokens):
  ``in flight`` is the Scheduler over TorchRunner; ``run to completion`` takes one request per client
  and decodes them together with transformers' ``generate`` until the longest ends (the previous path's
  batching, without its copies).

    python bench/serving/gpu.py                                   # writes bench/results/serving_gpu.json
    python bench/serving/gpu.py --device cpu --shapes tiny-qwen2 --seconds 2 --dtype float32   # the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from run import MAX_TOKENS_RANGE, SHORT_MAX_TOKENS, STEP_ROWS, Record, Window, Workload, bare_level, machine_info, \
    summarize  # bench/serving/run.py, beside this file

RESULTS = Path(__file__).resolve().parents[1] / "results" / "serving_gpu.json"
CONTEXTS = (50, 2000)
#: Slots of the cache (the most clients) and positions per slot (2,000 of context and room to step).
SLOTS, CAPACITY = 32, 2112


def config_of(shape: str, work: Path):
    """The transformers config of a shape; the tiny ones are the tests' (deepseek_builder.tiny)."""
    import transformers

    if shape == "qwen2-7b":
        return transformers.Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=False)
    if shape == "deepseek-v3-16b":
        return transformers.DeepseekV3Config(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
            n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False)
    if shape.startswith("tiny-"):
        from deepseek_builder.tiny import write_tiny_model

        return transformers.AutoConfig.from_pretrained(write_tiny_model(work / shape, arch=shape[5:], seed=1))
    raise SystemExit(f"unknown shape {shape!r}: qwen2-7b, deepseek-v3-16b, tiny-qwen2 or tiny-deepseek_v3")


def make_model(shape: str, device: str, dtype, work: Path):
    import torch
    from transformers import AutoModelForCausalLM

    config = config_of(shape, work)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompt_ids(workload: Workload, vocab: int) -> list[list[int]]:
    """Token ids for the workload's prompts: as many as their words times 1.5, drawn from a fixed seed."""
    rng = np.random.default_rng([workload.seed, 2])
    return [rng.integers(100, min(vocab, 30000), max(1, int(len(p.split()) * 1.5))).tolist()
            for p in workload.prompts()]


def timed(fn: Callable[[], Any], sync: Callable[[], None], repeats: int, *, until_return: bool = False) -> float:
    """Median ms of ``fn`` over ``repeats`` calls after two warm-ups, synchronised with the device; with
    ``until_return``, the time until ``fn`` returns (the host's share: what it takes to queue the device's work)."""
    samples = []
    for i in range(repeats + 2):
        sync()
        began = time.perf_counter()
        fn()
        returned = time.perf_counter()
        sync()
        if i >= 2:
            samples.append((returned if until_return else time.perf_counter()) - began)
    return round(float(np.median(samples)) * 1000.0, 2)


def step_times(model, runner, device: str, repeats: int) -> dict[str, Any]:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ids = np.full((STEP_ROWS, 1), 100, dtype=np.int64)
    mask = np.ones((STEP_ROWS, 1), dtype=np.int64)
    out: dict[str, Any] = {"rows": STEP_ROWS, "in_place_ms": {}, "in_place_queued_ms": {}, "host_round_trip_ms": {},
                           "transformers_ms": {}, "cache_bytes_round_trip": {}}
    for ctx in CONTEXTS:
        def queue():
            runner.cache.lengths[:STEP_ROWS] = ctx
            return runner.forward(0, ids, mask)

        def in_place():
            queue().argmax()

        def round_trip():
            in_place()
            for view in runner.cache.rows(0, STEP_ROWS):
                view[:, :, :ctx + 1].to("cpu").to(device)

        out["in_place_ms"][str(ctx)] = timed(in_place, sync, repeats)
        out["in_place_queued_ms"][str(ctx)] = timed(queue, sync, repeats, until_return=True)
        out["host_round_trip_ms"][str(ctx)] = timed(round_trip, sync, repeats)
        out["cache_bytes_round_trip"][str(ctx)] = int(
            sum(v[:, :, :ctx + 1].numel() * v.element_size() for v in runner.cache.rows(0, STEP_ROWS)))
    runner.cache.lengths[:] = 0
    try:
        from transformers import DynamicCache

        with torch.no_grad():
            for ctx in CONTEXTS:
                cache = DynamicCache(config=model.config)
                prompt = torch.randint(100, 30000, (STEP_ROWS, ctx), device=device)
                model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = torch.full((STEP_ROWS, 1), 100, device=device)

                def hf_step():
                    logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
                    logits[:, -1].argmax(-1).cpu()
                    cache.crop(-1)  # drop the step's position: every timed step sees ctx

                out["transformers_ms"][str(ctx)] = timed(hf_step, sync, repeats)
                del cache
    except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, not fatal
        out["transformers_error"] = f"{type(exc).__name__}: {exc}"
    return out


def static_level(model, device: str, ids: list[list[int]], workload: Workload, concurrency: int,
                 seconds: float) -> tuple[Window, float]:
    """Run to completion: each batch takes the next request of every client and decodes until the longest ends.

    Batches start until the window closes; tokens/s is every batch's tokens over their summed wall time (a
    batch's tokens all arrive at its end, so a window would count whole batches or none)."""
    import torch

    streams = [workload.requests(c) for c in range(concurrency)]
    records: list[Record] = []
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        batch = [next(s) for s in streams]
        prompts = [ids[p] for p, _ in batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros((concurrency, width), dtype=torch.long)
        attention = torch.zeros((concurrency, width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding, as generate wants for decoder-only models
            input_ids[r, width - len(p):] = torch.tensor(p)
            attention[r, width - len(p):] = 1
        longest = max(m for _, m in batch)
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                           max_new_tokens=longest, min_new_tokens=longest, pad_token_id=0)
        ended = time.perf_counter()
        records += [Record(m, start=began, end=ended, tokens=m, unary=True) for _, m in batch]
    walls = {(r.start, r.end) for r in records}
    return Window(records, start, deadline, start), sum(r.tokens for r in records) / sum(e - b for b, e in walls)


def measure_shape(shape: str, args) -> dict[str, Any]:
    import torch

    from deepseek_model_repository.serving.runners import TorchRunner

    dtype = getattr(torch, args.dtype)
    began = time.perf_counter()
    model = make_model(shape, args.device, dtype, args.work)
    params = sum(p.numel() for p in model.parameters())
    runner = TorchRunner(model, SLOTS, CAPACITY)
    result: dict[str, Any] = {"parameters": params, "dtype": args.dtype, "cache_slots": SLOTS,
                              "cache_capacity": CAPACITY, "cache_bytes": runner.cache.nbytes,
                              "cache_device": str(runner.cache.layers[0][0].device),
                              "setup_s": round(time.perf_counter() - began, 1)}
    print(f"[{shape}] {params / 1e9:.2f}B parameters, cache {runner.cache.nbytes / 2**30:.2f} GiB on "
          f"{result['cache_device']}", flush=True)
    pointers = [t.data_ptr() for layer in runner.cache.layers for t in layer]
    result["step"] = step_times(model, runner, args.device, args.step_repeats)
    print(f"[{shape}] step {json.dumps(result['step'])}", flush=True)
    workload = Workload()
    ids = prompt_ids(workload, runner.vocab_size)
    result["load"] = {}
    for concurrency in args.concurrency:
        level: dict[str, Any] = {}
        for name in ("in_flight", "run_to_completion"):
            try:
                if name == "in_flight":
                    bare_level(runner, [], ids, workload, concurrency, args.warmup)  # warm-up, not measured
                    level[name] = summarize([bare_level(runner, [], ids, workload, concurrency, args.seconds,
                                                        settle=1.0)])
                else:
                    window, tokens_per_s = static_level(model, args.device, ids, workload, concurrency,
                                                        args.seconds)
                    level[name] = {**summarize([window]), "tokens_per_s": round(tokens_per_s, 1)}
            except Exception as exc:  # noqa: BLE001 - recorded, and the other systems still run
                level[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            print(f"[{shape}] c={concurrency} {name}: "
                  f"{ {k: level[name].get(k) for k in ('tokens_per_s', 'short_p50_ms', 'ttft_p50_ms', 'itl_p50_ms', 'error')} }",
                  flush=True)
        result["load"][str(concurrency)] = level
    result["cache_allocated_once"] = pointers == [t.data_ptr() for layer in runner.cache.layers for t in layer]
    if args.device.startswith("cuda"):
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del runner, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def print_report(result: dict[str, Any]) -> None:
    for shape, r in result["shapes"].items():
        if "error" in r:
            print(f"\n{shape}: failed: {r['error']}")
            continue
        s = r["step"]
        print(f"\n{shape} ({r['parameters'] / 1e9:.1f}B, {r['dtype']}, cache {r['cache_bytes'] / 2**30:.2f} GiB on "
              f"{r['cache_device']}, allocated once: {r['cache_allocated_once']})")
        print(f"  decode step, {s['rows']} rows     " + "  ".join(f"{c:>6} ctx" for c in CONTEXTS))
        for key, label in (("in_place_ms", "in place"), ("in_place_queued_ms", "  of which queueing"),
                           ("host_round_trip_ms", "+ host round trip"),
                           ("transformers_ms", "transformers")):
            print(f"  {label:<22} " + "  ".join(f"{s[key].get(str(c), float('nan')):>7.2f} ms" for c in CONTEXTS))
        print(f"  {'clients':>7} {'in flight tok/s':>16} {'run to completion':>18} {'ratio':>6} "
              f"{'short p50 ms':>22} {'TTFT p50':>9} {'ITL p50':>8}")
        for c, level in r["load"].items():
            a, b = level.get("in_flight", {}), level.get("run_to_completion", {})
            ta, tb = a.get("tokens_per_s"), b.get("tokens_per_s")
            ratio = f"{ta / tb:.2f}" if ta and tb else "-"
            print(f"  {c:>7} {ta or '-':>16} {tb or '-':>18} {ratio:>6} {str(a.get('short_p50_ms')):>10} / "
                  f"{str(b.get('short_p50_ms')):<10} {str(a.get('ttft_p50_ms')):>9} {str(a.get('itl_p50_ms')):>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen2-7b", "deepseek-v3-16b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds of each level and system")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/serving-gpu"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/serving/gpu.py: torch sees no CUDA GPU; use --device cpu to check the script", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "machine": {**machine_info(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "workload": {"max_tokens": list(MAX_TOKENS_RANGE), "short_max_tokens": SHORT_MAX_TOKENS, "eos": "off"},
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "shapes": {}}
    for shape in args.shapes:
        try:
            result["shapes"][shape] = measure_shape(shape, args)
        except Exception as exc:  # noqa: BLE001 - the next shape still runs
            traceback.print_exc()
            result["shapes"][shape] = {"error": f"{type(exc).__name__}: {exc}"}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
