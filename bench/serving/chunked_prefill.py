"""What a long prompt that arrives does to the sequences already decoding: whole prefill against chunked prefill.

15 sequences decode (short prompts, greedy, no end) on an engine with 16 slots of 2,112 positions; once they run
steadily, one prompt of 2,000 tokens arrives.  Measured for each ``max_prefill_tokens`` (the scheduler's budget of
prompt tokens an iteration, ``serving.prefillChunkTokens``): the decoders' longest gap between two tokens while the
long prompt is prefilled (the stall it causes), their median gap before it arrived (a plain decode step), the long
prompt's time to first token, and the decoders' tokens/s from its arrival to its first token.  The baseline, in the
same run, is a budget of 2,048, which takes the whole prompt in one prefill (the scheduler before chunking always
did); the budgets alternate round by round, so load from elsewhere hits them alike.

Then the prefix sharing: a request whose prompt starts with the same 1,000-token system prompt as a sequence that
decodes, its time to first token with ``share_prefixes`` on (the start copied from that sequence's cache) and off.
And, at the runner, prompts of mixed lengths admitted together into an empty cache: one engine call padded to the
longest (the scheduler before it split its prefills) against the calls ``prefill_groups`` makes of them.

It runs the same ``Scheduler`` and ``OrtRunner`` as the served model, in a process that imports only the serving
code (as Triton's model process does: the bench's own process, with torch loaded for the build, runs the loop
slower); the engines are the builder's, built once and cached by content.

    python bench/serving/chunked_prefill.py      # prints a table, writes bench/results/chunked_prefill.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "chunked_prefill.json"
SLOTS, CAPACITY = 16, 2112
DECODERS, LONG_PROMPT = SLOTS - 1, 2000
#: The budgets compared; the first takes the whole long prompt at once (the baseline).
BUDGETS = (2048, 512, 256)
ARCHS = ("deepseek_v3", "qwen2")


def one_round(runner, budget: int, seed: int, long_prompt: int = LONG_PROMPT) -> dict[str, float]:
    """A decoder in every slot but one reaches a steady state, the long prompt arrives and gets its first token, the
    decoders go on a little, then everything is cancelled and the cache is empty again."""
    from deepseek_model_repository.serving.scheduler import Sampling, Scheduler, Sequence

    rng = np.random.default_rng(seed)
    scheduler = Scheduler(runner, eos_ids=[], max_prefill_tokens=budget).start()
    decoders, capacity = runner.cache.slots - 1, runner.cache.capacity
    stamps: list[list[float]] = [[] for _ in range(decoders)]
    stop = threading.Event()
    ended = threading.Semaphore(0)
    steady = threading.Event()
    first: dict[str, float] = {}

    def decoder(i: int) -> Sequence:
        def on_token(seq, token):
            stamps[i].append(time.perf_counter())
            if all(len(s) >= 8 for s in stamps):
                steady.set()
        return Sequence(rng.integers(3, 2000, 12).tolist(), Sampling(max_tokens=capacity - 20), on_token=on_token,
                        cancelled=stop.is_set)

    long_seq = Sequence(rng.integers(3, 2000, long_prompt).tolist(), Sampling(max_tokens=4),
                        on_token=lambda seq, token: first.setdefault("at", time.perf_counter()),
                        on_finish=lambda seq, error: ended.release())
    try:
        for i in range(decoders):
            scheduler.submit(decoder(i))
        if not steady.wait(120):
            raise RuntimeError("the decoders did not reach 8 tokens each within 120 s")
        arrived = time.perf_counter()
        scheduler.submit(long_seq)
        if not ended.acquire(timeout=300):
            raise RuntimeError("the long prompt did not finish within 300 s")
        time.sleep(0.05)
        stop.set()  # the decoders' clients "go away": the watcher marks them, the loop drops them (no answer)
        deadline = time.monotonic() + 60
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        if scheduler.running:
            raise RuntimeError("the cancelled decoders did not leave within 60 s")
    finally:
        stop.set()
        scheduler.stop()
    got = first["at"]
    before, during, tokens = [], [], 0
    for s in stamps:
        t = np.asarray(s)
        gaps = np.diff(t)
        before += gaps[t[1:] < arrived].tolist()
        during += gaps[(t[1:] > arrived) & (t[:-1] < got)].tolist()  # gaps that overlap the long prompt's prefill
        tokens += int(((t > arrived) & (t <= got)).sum())
    return {"decode_gap_ms": float(np.median(before)) * 1000, "longest_gap_ms": float(max(during)) * 1000,
            "ttft_ms": (got - arrived) * 1000, "decoder_tokens": tokens, "decoder_tokens_per_s": tokens / (got - arrived)}


#: The prefix-sharing measurement: a system prompt of this many tokens, then a question of its own for each request.
SYSTEM_PROMPT, QUESTION = 1000, 20


def prefix_round(runner, share: bool, seed: int) -> dict[str, float]:
    """One sequence decodes with a prompt that starts with a 1,000-token system prompt; a second request with the same
    system prompt and its own question arrives: its time to first token, with the scheduler's prefix sharing on or
    off."""
    from deepseek_model_repository.serving.scheduler import Sampling, Scheduler, Sequence

    rng = np.random.default_rng(seed)
    system = rng.integers(3, 2000, SYSTEM_PROMPT).tolist()
    scheduler = Scheduler(runner, eos_ids=[], share_prefixes=share).start()
    running, stop, first = threading.Event(), threading.Event(), {}
    decoding = Sequence(system + rng.integers(3, 2000, QUESTION).tolist(), Sampling(max_tokens=CAPACITY // 2),
                        on_token=lambda seq, token: len(seq.generated) >= 4 and running.set(), cancelled=stop.is_set)
    done = threading.Event()
    joining = Sequence(system + rng.integers(3, 2000, QUESTION).tolist(), Sampling(max_tokens=2),
                       on_token=lambda seq, token: first.setdefault("at", time.perf_counter()),
                       on_finish=lambda seq, error: done.set())
    try:
        scheduler.submit(decoding)
        if not running.wait(120):
            raise RuntimeError("the first sequence did not start within 120 s")
        arrived = time.perf_counter()
        scheduler.submit(joining)
        if not done.wait(120):
            raise RuntimeError("the second request did not finish within 120 s")
        stop.set()
        deadline = time.monotonic() + 60
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        scheduler.stop()
    return {"ttft_ms": (first["at"] - arrived) * 1000}


#: Prompts admitted together in the padding measurement: one long among short ones, and the reverse order.
MIXED_ADMISSIONS = ((1000,) + (20,) * 7, (20,) * 7 + (1000,), (300,) + (20,) * 4)


def padding_round(runner, chunks: tuple[int, ...]) -> dict[str, float]:
    """One iteration's prefill of ``chunks`` (prompts admitted together into an empty cache): as one call padded
    to the longest (the scheduler before it split its prefills), and as the calls :func:`prefill_groups` makes."""
    from deepseek_model_repository.serving.scheduler import prefill_groups

    def call(start: int, widths) -> float:
        ids = np.full((len(widths), max(widths)), 5, dtype=np.int64)
        mask = (np.arange(max(widths))[None, :] < np.asarray(widths)[:, None]).astype(np.int64)
        began = time.perf_counter()
        runner.forward(start, ids, mask)
        return time.perf_counter() - began

    runner.cache.lengths[:] = 0
    padded = call(0, chunks)
    runner.cache.lengths[:] = 0
    split = sum(call(a, chunks[a:b]) for a, b in prefill_groups(chunks))
    runner.cache.lengths[:] = 0
    return {"one_padded_call_ms": padded * 1000, "grouped_calls_ms": split * 1000}


def measure(engine_dir: Path, rounds: int) -> dict[str, Any]:
    """Every budget, ``rounds`` times, alternating; the median of each quantity per budget."""
    from deepseek_model_repository.serving.runners import open_runner

    info = json.loads((engine_dir / "model-info.json").read_text())
    runner = open_runner(engine_dir, info, slots=SLOTS, capacity=CAPACITY)
    one_round(runner, BUDGETS[-1], seed=0)  # warm-up
    samples: dict[int, list[dict[str, float]]] = {b: [] for b in BUDGETS}
    for r in range(rounds):
        for budget in BUDGETS:
            samples[budget].append(one_round(runner, budget, seed=r + 1))
    out: dict[str, Any] = {}
    for budget, rows in samples.items():
        out[str(budget)] = {key: round(float(np.median([row[key] for row in rows])), 1) for key in rows[0]}
        out[str(budget)]["rounds"] = [{k: round(v, 1) for k, v in row.items()} for row in rows]
    padding: dict[str, list[dict[str, float]]] = {",".join(map(str, c)): [] for c in MIXED_ADMISSIONS}
    for _ in range(rounds + 1):
        for chunks in MIXED_ADMISSIONS:
            padding[",".join(map(str, chunks))].append(padding_round(runner, chunks))
    sharing: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds + 1):
        for share in (False, True):
            ttft = prefix_round(runner, share, seed=100 + r)["ttft_ms"]
            if r:  # the first of each is a warm-up
                sharing["on" if share else "off"].append(ttft)
    out["prefix_sharing"] = {key: round(float(np.median(v)), 1) for key, v in sharing.items()}
    out["prefix_sharing"]["speedup"] = round(out["prefix_sharing"]["off"] / out["prefix_sharing"]["on"], 2)
    out["padding"] = {}
    for key, rows in padding.items():
        rows = rows[1:]  # the first of each is a warm-up
        medians = {k: round(float(np.median([row[k] for row in rows])), 1) for k in rows[0]}
        medians["speedup"] = round(medians["one_padded_call_ms"] / medians["grouped_calls_ms"], 2)
        out["padding"][key] = medians
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default: the local mode's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--measure", type=Path, metavar="ENGINE_DIR", help=argparse.SUPPRESS)  # the worker
    args = parser.parse_args()
    if args.measure:
        json.dump(measure(args.measure, args.rounds), sys.stdout)
        return 0
    sys.path.insert(0, str(HERE))
    from run import log, machine_info, tiny_resource  # bench/serving/run.py, beside this file

    from deepseek_local import local

    cache_dir = Path(args.cache_dir or local.default_cache_dir())
    result: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(), "slots": SLOTS, "capacity": CAPACITY, "decoders": DECODERS,
        "long_prompt_tokens": LONG_PROMPT, "rounds": args.rounds, "baseline_budget": BUDGETS[0],
        "statistic": "medians over rounds; gaps are the decoders' times between two tokens", "results": {},
    }
    for arch in args.archs:
        resource, _ = tiny_resource(cache_dir, f"bench-{arch.replace('_', '-')}-long", arch, SLOTS, CAPACITY)
        log(f"{arch}: engine (slots {SLOTS}, capacity {CAPACITY})")
        engine_dir = local.build_engine(resource, cache_dir, echo=lambda _: None)
        log(f"{arch}: {args.rounds} rounds of budgets {', '.join(map(str, BUDGETS))}")
        worker = subprocess.run([sys.executable, __file__, "--measure", str(engine_dir), "--rounds", str(args.rounds)],
                                check=True, stdout=subprocess.PIPE, text=True)  # its errors reach stderr
        result["results"][arch] = json.loads(worker.stdout)
    base = BUDGETS[0]
    print(f"{'model':<12} {'budget':>6} {'decode gap':>11} {'longest gap':>12} {'x whole':>8} {'TTFT':>9} "
          f"{'x whole':>8} {'decoders tok/s':>15}")
    for arch, rows in result["results"].items():
        for budget, row in rows.items():
            if budget in ("padding", "prefix_sharing"):
                continue
            row["longest_gap_vs_whole"] = round(row["longest_gap_ms"] / rows[str(base)]["longest_gap_ms"], 2)
            row["ttft_vs_whole"] = round(row["ttft_ms"] / rows[str(base)]["ttft_ms"], 2)
            print(f"{arch:<12} {budget:>6} {row['decode_gap_ms']:>8.1f} ms {row['longest_gap_ms']:>9.1f} ms "
                  f"{row['longest_gap_vs_whole']:>7.2f}x {row['ttft_ms']:>6.1f} ms {row['ttft_vs_whole']:>7.2f}x "
                  f"{row['decoder_tokens_per_s']:>15.0f}")
    print(f"\n{'model':<12} {'prompts admitted together':<28} {'one padded call':>16} {'grouped calls':>14} {'speedup':>8}")
    for arch, rows in result["results"].items():
        for key, row in rows["padding"].items():
            counts = key.split(",")
            label = " + ".join(f"{counts.count(n)} x {n}" if counts.count(n) > 1 else n for n in dict.fromkeys(counts))
            print(f"{arch:<12} {label:<28} {row['one_padded_call_ms']:>13.1f} ms {row['grouped_calls_ms']:>11.1f} ms "
                  f"{row['speedup']:>7.2f}x")
    print(f"\n{'model':<12} {'TTFT, 1,000-token shared start: prefilled':>42} {'copied':>9} {'speedup':>8}")
    for arch, rows in result["results"].items():
        row = rows["prefix_sharing"]
        print(f"{arch:<12} {row['off']:>39.1f} ms {row['on']:>6.1f} ms {row['speedup']:>7.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
