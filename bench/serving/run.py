"""Text-generation serving: in-flight batching against its baselines, at concurrency 1, 8 and 32.

Closed-loop mixed-length load (C clients, each sending its next request when the previous one ends)
on the tiny DeepSeek-V3 (MLA + MoE) and the tiny Qwen2 (the R1-Distill shape), with the same
weights, the same requests (prompt lengths and max_tokens drawn from a fixed seed) and greedy
decoding everywhere.  Systems, each measured in this one run, in rounds that interleave them:

* ``inflight``: the served path, ``NAME_stream`` on the local Triton (the scheduler and the ONNX
  Runtime engine in one Python-backend model), streamed over gRPC;
* ``inflight-unary``: the same model through ``NAME`` (plain gRPC requests, one response each);
* ``inflight-paced``: the same engine served with ``serving.streamInterval`` 4, streamed (the first token
  at once, then a response per 4 tokens); its ITL is not reported (tokens arrive 4 at a time);
* ``previous`` (a): the run-to-completion path as it was at commit 234236b (``legacy.py`` rebuilds it
  from git: dynamic batches decoded to completion, one BLS call per token to ``NAME_engine``, the
  whole cache through shared memory), streamed, on the same Triton;
* ``bare`` (b): the same Scheduler and OrtRunner in a process of their own, no server, clients
  resubmitting from the scheduler's callbacks (the serving overhead);
* ``transformers`` (c): ``transformers serve --continuous-batching``, ``/v1/completions`` streamed
  over loopback; Qwen2 measured, DeepSeek-V3 tried and its failure recorded.

Also the decode step time with 16 rows at about 2,000 and about 50 tokens of context, for the new
runner and for the previous path's format-1 engine.

    python bench/serving/run.py                       # everything (about 8 minutes on 2 cores)
    python bench/serving/run.py --seconds 4 --rounds 2 --concurrency 1 8 --archs qwen2 --systems inflight bare

Writes bench/results/serving.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

import numpy as np

from deepseek_model_repository.serving.processes import children, stat_fields, stub_model
from deepseek_model_repository.serving.scheduler import DECODE, PREFILL, NoMetrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "bench" / "results" / "serving.json"

ARCHS = {"deepseek_v3": "tiny DeepSeek-V3 (MLA + MoE)", "qwen2": "tiny Qwen2 (the R1-Distill shape)"}
SYSTEMS = ("inflight", "inflight-unary", "inflight-paced", "previous", "bare", "transformers")
#: ``serving.streamInterval`` of the ``inflight-paced`` system: tokens per streamed response.
PACED_INTERVAL = 4
#: Engine maxBatchSize: the KV cache's slots (the scheduler) and Triton's max batch (the previous path).  The
#: highest concurrency, so that every client can hold a slot, as transformers' paged cache admits them all.
SLOTS = 32
#: Sequences in the decode-step timing.
STEP_ROWS = 16
#: maxSequenceLength of the served engines: the longest prompt (about 60 tokens) plus 96 new ones fits.
CAPACITY = 256
#: maxSequenceLength of the engine the decode-step timing uses (2,000 tokens of context and room to step).
LONG_CAPACITY = 2112
SHORT_MAX_TOKENS = 16
SHORT_SHARE = 0.3
MAX_TOKENS_RANGE = (4, 96)
PROMPT_WORDS_RANGE = (2, 40)
WORDS = ("the model serves tokens from a cache on every step while clients wait for their answers and the "
         "scheduler admits new requests between two decode steps so that short ones leave early kubernetes "
         "triton operator engine batch latency throughput prompt context attention expert router layer "
         "weights graph runtime memory device process server stream request response queue slot").split()


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    """The requests every system sees: client ``c``'s k-th request is the same everywhere."""

    seed: int = 20260
    pool: int = 64

    def prompts(self) -> list[str]:
        rng = np.random.default_rng([self.seed, 0])
        out = []
        for _ in range(self.pool):
            n = int(rng.integers(PROMPT_WORDS_RANGE[0], PROMPT_WORDS_RANGE[1] + 1))
            out.append(" ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n)).capitalize())
        return out

    def requests(self, client: int) -> Iterator[tuple[int, int]]:
        """(prompt index, max_tokens) for ever: a share of short requests (max_tokens <= 16), the rest up to 96."""
        rng = np.random.default_rng([self.seed, 1, client])
        while True:
            if rng.random() < SHORT_SHARE:
                max_tokens = int(rng.integers(MAX_TOKENS_RANGE[0], SHORT_MAX_TOKENS + 1))
            else:
                max_tokens = int(rng.integers(SHORT_MAX_TOKENS + 1, MAX_TOKENS_RANGE[1] + 1))
            yield int(rng.integers(0, self.pool)), max_tokens


@dataclass
class Record:
    """One request as its client saw it: the arrival time of each piece of text and the tokens it carries (one,
    but for a paced stream).

    A plain (unary) request has no arrival times: its ``tokens`` count at ``end``."""

    max_tokens: int
    start: float = 0.0
    end: Optional[float] = None
    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    tokens: int = 0
    #: Pieces of several tokens (a paced stream): no inter-token latency is taken from them.
    paced: bool = False
    #: Tokens the server says it generated, where it says so (transformers' usage), else None.
    reported_tokens: Optional[int] = None
    error: Optional[str] = None
    unary: bool = False

    def piece(self, at: float, tokens: int = 1) -> None:
        self.times.append(at)
        self.sizes.append(tokens)
        self.tokens += tokens


def percentile(values, q: float) -> Optional[float]:
    """The q-th percentile (linear interpolation), None for no values."""
    values = list(values)
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


@dataclass
class Window:
    """One measured level: its records and the measured window [start, deadline].

    The clients began at ``began`` (at or before ``start``): the load settles before the window opens, so that
    the window sees the steady state and not the ramp from idle. Only then does counting a plain request's tokens
    when its response arrives measure what streaming's count measures: at a window that opens on an idle server
    every request in flight at the deadline has made tokens that count for a stream and not for a plain request
    (at 32 clients some 30 tokens each), while none were in flight at the opening to make up for them.
    """

    records: list[Record]
    start: float
    deadline: float
    began: Optional[float] = None
    #: The scheduler's engine calls over the whole round (settling, window and drain): phase -> [seconds, calls].
    engine: Optional[dict[str, list[float]]] = None
    #: CPU seconds each process used over the same round, by role (:func:`cpu_by_role`).
    cpu: Optional[dict[str, float]] = None

    def wall(self) -> float:
        """The round's wall time: from the clients' start to the last response."""
        ends = [r.end for r in self.records if r.end is not None]
        began = self.start if self.began is None else self.began
        return (max(ends) - began) if ends else 0.0

    def cpu_cores(self) -> Optional[dict[str, float]]:
        """The cores each role used on average over the round (CPU seconds over wall seconds)."""
        wall = self.wall()
        if not self.cpu or wall <= 0:
            return None
        return {role: seconds / wall for role, seconds in self.cpu.items()}

    def engine_summary(self) -> Optional[dict[str, Optional[float]]]:
        """Mean prefill and decode-step times (ms) and the share of the round's wall time spent in the engine."""
        if not self.engine:
            return None
        wall = self.wall()

        def mean_ms(phase):
            seconds, calls = self.engine.get(phase, (0.0, 0))
            return seconds / calls * 1000.0 if calls else None

        def per_s(phase):
            return self.engine.get(phase, (0.0, 0))[1] / wall if wall > 0 else None

        busy = sum(seconds for seconds, _ in self.engine.values())
        return {"prefill_ms": mean_ms(PREFILL), "decode_step_ms": mean_ms(DECODE),
                "prefills_per_s": per_s(PREFILL), "decode_steps_per_s": per_s(DECODE),
                "busy": busy / wall if wall > 0 else None}

    def _tokens_per_s(self, start: float, deadline: float) -> float:
        tokens = sum(n for r in self.records for t, n in zip(r.times, r.sizes) if start <= t <= deadline)
        tokens += sum(r.tokens for r in self.records
                      if r.unary and r.end is not None and start <= r.end <= deadline)
        return tokens / (deadline - start)

    @property
    def tokens_per_s(self) -> float:
        """Tokens that reached the client within the window, per second."""
        return self._tokens_per_s(self.start, self.deadline)

    @property
    def tokens_per_s_from_idle(self) -> float:
        """The same count over a window of the same length that opens when the clients begin (the ramp included),
        which is how this bench counted before it let the load settle."""
        began = self.start if self.began is None else self.began
        return self._tokens_per_s(began, began + (self.deadline - self.start))

    def measured(self) -> list[Record]:
        """The requests sent within the window (each followed to its end)."""
        return [r for r in self.records if r.start >= self.start]


def summarize(windows: list[Window]) -> dict[str, Any]:
    """Tokens/s: the median over rounds of the tokens that arrived within each round's window.
    TTFT, ITL and latencies: percentiles over every completed request sent within a round's window."""
    records = [r for w in windows for r in w.measured()]
    done = [r for r in records if r.error is None and r.end is not None]
    ttft = [r.times[0] - r.start for r in done if r.times]
    itl = [b - a for r in done if not r.paced for a, b in zip(r.times, r.times[1:])]
    # Time per output token of each request (its mean inter-token time): not fooled by tokens that arrive in bursts.
    tpot = [(r.times[-1] - r.times[0]) / (r.tokens - r.sizes[0]) for r in done
            if len(r.times) > 1 and r.tokens > r.sizes[0]]
    short = [r.end - r.start for r in done if r.max_tokens <= SHORT_MAX_TOKENS]
    latency = [r.end - r.start for r in done]
    per_round = [w.tokens_per_s for w in windows]
    from_idle = [w.tokens_per_s_from_idle for w in windows]
    engine = [e for e in (w.engine_summary() for w in windows) if e]
    cores = [c for c in (w.cpu_cores() for w in windows) if c]

    def engine_median(key, digits):
        values = [e[key] for e in engine if e[key] is not None]
        return round(float(np.median(values)), digits) if values else None

    def ms(v):
        return None if v is None else round(v * 1000.0, 2)

    return {
        "requests": len(done),
        "errors": len(records) - len(done),
        "first_error": next((r.error for r in records if r.error), None),
        "tokens": int(sum(r.tokens for r in done)),
        "tokens_per_s": round(float(np.median(per_round)), 1) if per_round else None,
        "tokens_per_s_rounds": [round(x, 1) for x in per_round],
        "tokens_per_s_from_idle": round(float(np.median(from_idle)), 1) if from_idle else None,
        "mean_tokens_per_request": round(float(np.mean([r.tokens for r in done])), 1) if done else None,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p99_ms": ms(percentile(itl, 99)),
        "tpot_p50_ms": ms(percentile(tpot, 50)),
        "short_requests": len(short),
        "short_p50_ms": ms(percentile(short, 50)),
        "latency_p50_ms": ms(percentile(latency, 50)),
        "latency_p99_ms": ms(percentile(latency, 99)),
        # The scheduler's own engine timing (deepseek_scheduler_engine_step_seconds), median over rounds.
        "engine_decode_step_ms": engine_median("decode_step_ms", 2),
        "engine_prefill_ms": engine_median("prefill_ms", 2),
        "engine_busy": engine_median("busy", 3),
        "engine_prefills_per_s": engine_median("prefills_per_s", 1),
        "engine_decode_steps_per_s": engine_median("decode_steps_per_s", 1),
        # Cores each process used over the round, median over rounds (cpu_by_role).
        "cpu_cores": {role: round(float(np.median([c[role] for c in cores if role in c])), 3)
                      for role in sorted({r for c in cores for r in c})} or None,
    }


#: The scheduler's engine-call histogram (models/generate/model.py), as Triton's metrics port serves it.
ENGINE_SERIES = "deepseek_scheduler_engine_step_seconds_"


def engine_totals(metrics_text: str, model: str) -> dict[str, list[float]]:
    """phase -> [seconds, calls] of the engine calls of the scheduler serving ``model``, from Prometheus text."""
    totals: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(ENGINE_SERIES) or f'model="{model}"' not in line:
            continue
        series, value = line.rsplit(" ", 1)
        kind = series.split("{", 1)[0][len(ENGINE_SERIES):]
        if kind not in ("sum", "count") or 'phase="' not in series:
            continue
        phase = series.split('phase="', 1)[1].split('"', 1)[0]
        totals.setdefault(phase, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return totals


def engine_delta(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, list[float]]:
    """What ``after`` added to ``before`` (two reads of :func:`engine_totals`)."""
    return {phase: [s - before.get(phase, (0.0, 0.0))[0], n - before.get(phase, (0.0, 0.0))[1]]
            for phase, (s, n) in after.items()}


async def scrape_engine(metrics_url: str, model: str, settle_s: float = 0.05, timeout: float = 3.0) -> dict:
    """:func:`engine_totals` once two reads ``settle_s`` apart agree, the first of them after the scheduler's idle
    publication (it publishes once it has been idle for ``IDLE_PUBLISH_S``)."""
    import urllib.request

    from deepseek_model_repository.serving.metrics import IDLE_PUBLISH_S

    def read():
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            return engine_totals(r.read().decode(), model)

    await asyncio.sleep(2 * IDLE_PUBLISH_S)
    last = await asyncio.to_thread(read)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(settle_s)
        now = await asyncio.to_thread(read)
        if now == last:
            break
        last = now
    return last


#: The roles of the processes whose CPU each round counts (the served ones; the bare loop is one process).
CPU_ROLES = ("scheduler", "relay", "other models", "tritonserver", "client")
#: The bare loop's one process (its scheduler, engine and clients).
BARE_ROLE = "bare loop"
#: ``transformers serve``'s one process.
TRANSFORMERS_ROLE = "transformers serve"


def cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """User and system CPU seconds of process ``pid``, all its threads, 0 for one gone."""
    fields = stat_fields(pid, proc)  # state is field 3, ppid 4, utime 14, stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def cpu_by_role(server_pid: int, scheduler_model: str, relay_model: Optional[str],
                proc: Path = Path("/proc")) -> dict[str, float]:
    """CPU seconds so far, by role: the scheduler model's stub, the relay's (plain requests only), every other
    model's stubs, tritonserver itself, and this process (the load generator)."""
    roles = {role: 0.0 for role in CPU_ROLES}
    roles["tritonserver"] = cpu_seconds(server_pid, proc)
    for pid in children(server_pid, proc):
        model = stub_model(pid, proc)
        role = ("scheduler" if model == scheduler_model else "relay" if model == relay_model else "other models")
        roles[role] += cpu_seconds(pid, proc)
    roles["client"] = cpu_seconds(os.getpid(), proc)
    if relay_model is None:
        del roles["relay"]
    return roles


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: after[role] - before.get(role, 0.0) for role in after}


class EngineTime(NoMetrics):
    """The bare loop's scheduler metrics: its engine calls summed by phase, as the served histogram's _sum and
    _count are; the scheduler's other metrics are dropped."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def engine_step(self, phase, seconds):
        total = self.totals.setdefault(phase, [0.0, 0])
        total[0] += seconds
        total[1] += 1


async def closed_loop(send: Callable[[str, int, Record], Awaitable[None]], prompts: list[str], workload: Workload,
                      concurrency: int, seconds: float, settle: float = 0.0, drain_s: float = 120.0) -> Window:
    """C clients for ``settle`` and then ``seconds`` measured: each sends its next request when the previous one
    ends (in-flight ones finish)."""
    records: list[Record] = []
    began = time.perf_counter()
    start = began + settle
    deadline = start + seconds

    async def client(c: int) -> None:
        for prompt, max_tokens in workload.requests(c):
            if time.perf_counter() >= deadline:
                return
            record = Record(max_tokens)
            records.append(record)
            record.start = time.perf_counter()
            try:
                await send(prompts[prompt], max_tokens, record)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                record.error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.05)
                continue
            record.end = time.perf_counter()

    await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(concurrency))), settle + seconds + drain_s)
    return Window(records, start, deadline, began)


# ------------------------------------------------------------------ clients
def triton_sender(url: str, model: str, interval: int = 1, greedy_lengths: Optional[dict[str, int]] = None,
                  persistent: bool = True):
    """Streams each request to ``model`` (decoupled) over gRPC; every non-empty text piece is a token.

    ``persistent``: each client keeps one gRPC stream open and sends its requests over it one after another, as
    Triton's perf_analyzer and long-lived streaming clients do (the end of a request is Triton's
    ``triton_final_response``); otherwise each request opens a stream of its own.  A model paced at ``interval``
    tokens per response: the first piece is one token, each later one ``interval``, and the last what is left of
    the prompt's greedy length (``greedy_lengths``)."""
    import tritonclient.grpc.aio as aioclient

    from deepseek_model_repository.client import generation_inputs

    client = aioclient.InferenceServerClient(url)
    streams: dict[Any, "_ClientStream"] = {}

    class _ClientStream:
        """One client's open stream: requests go in through a queue, responses come out in order.  tritonclient's
        ``stream_infer`` refuses ``triton_``-prefixed parameters, so the requests are built here and carry
        ``triton_enable_empty_final_response``, which marks each request's last response."""

        def __init__(self):
            self.queue: asyncio.Queue = asyncio.Queue()
            self.call = client._client_stub.ModelStreamInfer(self._requests())
            self.responses = self.call.__aiter__()

        async def _requests(self):
            from tritonclient.grpc._utils import _get_inference_request

            while True:
                inputs = await self.queue.get()
                if inputs is None:
                    return
                request = _get_inference_request(model_name=model, inputs=inputs, model_version="", request_id="",
                                                 outputs=None, sequence_id=0, sequence_start=False,
                                                 sequence_end=False, priority=0, timeout=None, parameters=None)
                request.parameters["triton_enable_empty_final_response"].bool_param = True
                yield request

        async def next(self):
            response = await self.responses.__anext__()
            if response.error_message:
                return None, response.error_message
            return aioclient.InferResult(response.infer_response), None

        def close(self) -> None:
            self.queue.put_nowait(None)

    def piece(result, record: Record, now: float) -> None:
        text = result.as_numpy("text_output")
        if text is not None and text.reshape(-1)[0]:
            record.piece(now, 1 if not record.times else interval)

    async def send(prompt: str, max_tokens: int, record: Record) -> None:
        request = {"model_name": model,
                   "inputs": generation_inputs(aioclient, prompt, max_tokens=max_tokens, stream=True)}
        if persistent:
            task = asyncio.current_task()
            stream = streams.get(task)
            if stream is None:
                stream = streams[task] = _ClientStream()
                task.add_done_callback(lambda t: streams.pop(t, stream).close())
            await stream.queue.put(request["inputs"])
            while True:
                result, error = await stream.next()
                now = time.perf_counter()
                if error is not None:  # the stream is dropped: the client's next request opens another
                    streams.pop(task, None)
                    stream.close()
                    stream.call.cancel()
                    raise RuntimeError(error)
                if result.get_output("text_output") is not None:
                    piece(result, record, now)
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
        else:
            async def one():
                yield request

            # The server ends the call after the request's final response (the client has finished writing).
            async for result, error in client.stream_infer(one()):
                now = time.perf_counter()
                if error is not None:
                    raise RuntimeError(error.message() if hasattr(error, "message") else str(error))
                piece(result, record, now)
        if interval > 1 and record.times:
            record.paced = True
            total = min(max_tokens, greedy_lengths[prompt])
            record.sizes[-1] = max(0, record.sizes[-1] + total - record.tokens)
            record.tokens = sum(record.sizes)

    return send, client.close


def unary_sender(url: str, model: str, greedy_lengths: dict[str, int]):
    """Plain requests to ``model`` over gRPC (one response each); tokens from the greedy length of the prompt."""
    import tritonclient.grpc.aio as aioclient

    from deepseek_model_repository.client import generation_inputs

    client = aioclient.InferenceServerClient(url)

    async def send(prompt: str, max_tokens: int, record: Record) -> None:
        record.unary = True
        await client.infer(model, generation_inputs(aioclient, prompt, max_tokens=max_tokens))
        record.tokens = min(max_tokens, greedy_lengths[prompt])

    return send, client.close


def openai_sender(base_url: str, model: str):
    """Streams one request to an OpenAI-style ``/v1/completions`` (SSE); a chunk with text is a token."""
    import aiohttp

    # The server closes connections idle for 5 s (uvicorn's default), and rounds of the other systems run in
    # between: never reuse a connection that may have been closed under the client.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2),
                                    timeout=aiohttp.ClientTimeout(total=120))

    async def send(prompt: str, max_tokens: int, record: Record) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        async with session.post(f"{base_url}/v1/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            buffer = b""
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    data = event.strip()
                    if data.startswith(b"data:"):
                        data = data[5:].strip()
                    if not data or data == b"[DONE]":
                        continue
                    message = json.loads(data)
                    if "error" in message:
                        raise RuntimeError(str(message["error"]))
                    if (message.get("choices") or [{}])[0].get("text"):
                        record.piece(now)
                    if message.get("usage"):
                        record.reported_tokens = int(message["usage"]["completion_tokens"])

    return send, session.close


# ------------------------------------------------------------------ the bare engine loop
def bare_level(runner, eos_ids, prompt_ids: list[list[int]], workload: Workload, concurrency: int,
               seconds: float, settle: float = 0.0) -> Window:
    """The same Scheduler and runner in this process: clients resubmit from the scheduler's on_finish."""
    from deepseek_model_repository.serving.scheduler import Sampling, Scheduler, Sequence

    engine = EngineTime()
    scheduler = Scheduler(runner, eos_ids, metrics=engine).start()
    records: list[Record] = []
    lock = threading.Lock()
    clients_left = [concurrency]
    all_done = threading.Event()
    began = time.perf_counter()
    start = began + settle
    deadline = start + seconds

    def submit(c: int, requests: Iterator[tuple[int, int]]) -> None:
        if time.perf_counter() >= deadline:
            with lock:
                clients_left[0] -= 1
                if clients_left[0] == 0:
                    all_done.set()
            return
        prompt, max_tokens = next(requests)
        record = Record(max_tokens)
        with lock:
            records.append(record)

        def on_token(seq, token):
            record.piece(time.perf_counter())

        def on_finish(seq, error):
            record.end = time.perf_counter()
            record.error = error
            submit(c, requests)

        record.start = time.perf_counter()
        scheduler.submit(Sequence(prompt_ids[prompt], Sampling(max_tokens=max_tokens), on_token=on_token,
                                  on_finish=on_finish))

    for c in range(concurrency):
        submit(c, workload.requests(c))
    finished = all_done.wait(settle + seconds + 120)
    scheduler.stop()
    if not finished:
        records.append(Record(0, error="the bare loop did not drain in time"))
    return Window(records, start, deadline, began, engine.totals)


class BareWorker:
    """The bare engine loop in a process of its own that imports only the serving code (as Triton's model does):
    one level per request line on stdin, its records as one JSON line on stdout."""

    def __init__(self, engine_dir: Path, prompt_ids: list[list[int]], workload: Workload):
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--bare-worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self._send({"engine_dir": str(engine_dir), "prompt_ids": prompt_ids, "seed": workload.seed,
                    "pool": workload.pool})

    def _send(self, message: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bare-loop worker exited ({self.process.wait()})")
        return json.loads(line)

    def level(self, concurrency: int, seconds: float, settle: float = 0.0) -> Window:
        answer = self._send({"concurrency": concurrency, "seconds": seconds, "settle": settle})
        records = [Record(m, start=s, end=e, times=t, sizes=z, tokens=n, error=err)
                   for m, s, e, t, z, n, err in answer["records"]]
        return Window(records, answer["start"], answer["deadline"], answer["began"], answer.get("engine"),
                      answer.get("cpu"))

    def greedy_lengths(self, max_tokens: int) -> list[int]:
        return self._send({"greedy_lengths": max_tokens})

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bare_worker_main() -> int:
    """The worker's side of :class:`BareWorker`."""
    from deepseek_model_repository.serving.runners import open_runner

    setup = json.loads(sys.stdin.readline())
    engine_dir = Path(setup["engine_dir"])
    info = json.loads((engine_dir / "model-info.json").read_text())
    runner = open_runner(engine_dir, info, slots=int(info["max_batch_size"]),
                         capacity=int(info["max_sequence_length"]))
    workload = Workload(seed=setup["seed"], pool=setup["pool"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        if "greedy_lengths" in ask:
            print(json.dumps(greedy_lengths(runner, info.get("eos_token_ids", []), setup["prompt_ids"],
                                            ask["greedy_lengths"])), flush=True)
            continue
        cpu_before = cpu_seconds(os.getpid())
        w = bare_level(runner, info.get("eos_token_ids", []), setup["prompt_ids"], workload, ask["concurrency"],
                       ask["seconds"], ask.get("settle", 0.0))
        cpu = {BARE_ROLE: cpu_seconds(os.getpid()) - cpu_before}
        records = [[r.max_tokens, r.start, r.end, r.times, r.sizes, r.tokens, r.error] for r in w.records]
        print(json.dumps({"start": w.start, "deadline": w.deadline, "began": w.began, "engine": w.engine,
                          "cpu": cpu, "records": records}), flush=True)
    return 0


def greedy_lengths(runner, eos_ids, prompt_ids: list[list[int]], max_tokens: int) -> list[int]:
    """How many tokens greedy decoding gives each prompt, up to ``max_tokens`` (fewer where it ends at EOS)."""
    from deepseek_model_repository.serving.scheduler import Sampling, Scheduler, Sequence

    scheduler = Scheduler(runner, eos_ids).start()
    done = threading.Semaphore(0)
    sequences = [Sequence(ids, Sampling(max_tokens=max_tokens), on_finish=lambda seq, error: done.release())
                 for ids in prompt_ids]
    for seq in sequences:
        scheduler.submit(seq)
    for _ in sequences:
        done.acquire(timeout=120)
    scheduler.stop()
    return [len(seq.generated) for seq in sequences]


# ------------------------------------------------------------------ decode step time
def step_times(runner, contexts: list[int], repeats: int) -> dict[str, float]:
    """Median ms of ``runner.step`` for one decode token in every slot, each slot holding ``ctx`` positions."""
    slots = runner.cache.slots
    ids = np.full((slots, 1), 100, dtype=np.int64)
    mask = np.ones((slots, 1), dtype=np.int64)
    samples: dict[int, list[float]] = {ctx: [] for ctx in contexts}
    for i in range(repeats + 2):  # the contexts alternate, so load from elsewhere hits them alike
        for ctx in contexts:
            runner.cache.lengths[:] = ctx
            began = time.perf_counter()
            runner.step(0, ids, mask)
            if i >= 2:
                samples[ctx].append(time.perf_counter() - began)
    runner.cache.lengths[:] = 0
    return {str(ctx): round(float(np.median(v)) * 1000.0, 2) for ctx, v in samples.items()}


def legacy_step_times(engine_dir: Path, slots: int, contexts: list[int], repeats: int) -> dict[str, Any]:
    """The format-1 engine, in this process: past [B, H, ctx, D] in, the concatenated cache out.

    ``engine_ms`` is the session call; ``with_copies_ms`` adds what the old loop did to the outputs
    before the next step (select the running rows, make them contiguous for the BLS request).  The
    shared-memory transfers between the two Triton models come on top and are not timed here.
    """
    import onnxruntime as ort

    info = json.loads((engine_dir / "model-info.json").read_text())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(engine_dir / info["engine_file"]), options, providers=["CPUExecutionProvider"])
    by_name = {t["name"]: t for t in info["inputs"]}
    past_names = info["kv_cache"]["past_inputs"]
    present_names = info["kv_cache"]["present_outputs"]
    rng = np.random.default_rng(0)
    output_names = [o.name for o in session.get_outputs()]
    all_feeds = {}
    for ctx in contexts:
        feeds = {"input_ids": np.full((slots, 1), 100, dtype=np.int64),
                 "attention_mask": np.ones((slots, ctx + 1), dtype=np.int64),
                 "position_ids": np.full((slots, 1), ctx, dtype=np.int64)}
        for name in past_names:
            heads, _, dim = by_name[name]["dims"]
            feeds[name] = (rng.standard_normal((slots, heads, ctx, dim)) * 0.5).astype(np.float32)
        all_feeds[ctx] = feeds
    rows = np.arange(slots)
    run_s: dict[int, list[float]] = {ctx: [] for ctx in contexts}
    copy_s: dict[int, list[float]] = {ctx: [] for ctx in contexts}
    moved = {}
    for i in range(repeats + 2):
        for ctx, feeds in all_feeds.items():
            began = time.perf_counter()
            outputs = dict(zip(output_names, session.run(output_names, feeds)))
            ran = time.perf_counter()
            nxt = [np.ascontiguousarray(outputs[name][rows]) for name in present_names]
            copied = time.perf_counter()
            if i >= 2:
                run_s[ctx].append(ran - began)
                copy_s[ctx].append(copied - began)
            moved[str(ctx)] = int(sum(a.nbytes for a in nxt) + sum(feeds[n].nbytes for n in past_names))
    engine = {str(c): round(float(np.median(v)) * 1000.0, 2) for c, v in run_s.items()}
    copies = {str(c): round(float(np.median(v)) * 1000.0, 2) for c, v in copy_s.items()}
    return {"engine_ms": engine, "with_copies_ms": copies, "cache_bytes_in_and_out_per_step": moved}


# ------------------------------------------------------------------ transformers serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: transformers' paged cache: pages of this many tokens (its default), and twice the in-flight engine's positions.
#: Left to size itself on a CPU it takes 60% of the machine's memory (14 GB of 24 here), whatever else runs.
TRANSFORMERS_PAGE = 256
TRANSFORMERS_PAGES = -(-2 * SLOTS * CAPACITY // TRANSFORMERS_PAGE)


class TransformersServe:
    """``transformers serve --continuous-batching MODEL`` on a loopback port, in its own process group."""

    FLAGS = ("--continuous-batching", "--cb-block-size", str(TRANSFORMERS_PAGE), "--cb-num-blocks",
             str(TRANSFORMERS_PAGES))

    def __init__(self, model_dir: Path, log_path: Path):
        self.model_dir = model_dir
        self.port = free_port()
        self.log_path = log_path
        exe = Path(sys.executable).with_name("transformers")
        command = [str(exe) if exe.exists() else "transformers", "serve", *self.FLAGS,
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", str(model_dir)]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({self.process.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"transformers serve not ready in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()


async def probe_openai(url: str, model: str, prompt: str) -> Optional[str]:
    """One request (the first one sets up the paged cache, seconds): None when it streamed tokens, else the error."""
    send, close = openai_sender(url, model)
    try:
        record = Record(8)
        try:
            await asyncio.wait_for(send(prompt, 8, record), 90)
        except Exception as exc:  # noqa: BLE001 - the failure is the result
            return f"{type(exc).__name__}: {exc}"
        return None if record.tokens else "the first request returned no tokens"
    finally:
        await close()


def first_error_line(log: str) -> str:
    """The most telling line of a traceback: the last one naming an Error or Exception."""
    lines = [l.strip() for l in log.splitlines() if "Error" in l or "Exception" in l]
    return lines[-1] if lines else (log.strip().splitlines() or [""])[-1]


# ------------------------------------------------------------------ engines
def tiny_resource(cache_dir: Path, name: str, arch: str, slots: int, capacity: int):
    """The local-tiny example CR for ``arch``'s tiny checkpoint with the given slots and capacity."""
    import yaml

    from deepseek_local import local
    from deepseek_operator import api

    raw = yaml.safe_load((local.EXAMPLES_DIR / local.DEFAULT_EXAMPLE).read_text())
    model_dir = Path(cache_dir) / "tiny-models" / f"{arch}-text-generation"
    local.ensure_tiny_model(model_dir, arch, "text-generation")
    raw["metadata"]["name"] = name
    raw["metadata"]["annotations"] = {}
    raw["spec"]["model"]["source"] = f"file://{model_dir.resolve()}"
    raw["spec"]["engine"]["maxBatchSize"] = slots
    raw["spec"]["engine"]["maxSequenceLength"] = capacity
    return api.parse_resource(raw), model_dir


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(), "gpu": None,
            "python": platform.python_version(),
            "note": "a shared machine: other load may have been present during the run (see load averages)"}


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# ------------------------------------------------------------------ the run
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default: the local mode's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds of each level, over all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="rounds that interleave the systems at each level")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each system's levels")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds of load in each round before its measured window opens")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--step-repeats", type=int, default=12)
    parser.add_argument("--no-step", action="store_true", help="skip the decode-step timing")
    parser.add_argument("--per-request-streams", action="store_true",
                        help="open a gRPC stream per streamed request instead of one per client")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print the tables of a results file as Markdown, and run nothing")
    args = parser.parse_args(argv)
    if args.settle < 0:
        parser.error(f"--settle {args.settle}: the seconds of load before each window must be 0 or more")
    if args.markdown:
        print(markdown_report(json.loads(args.markdown.read_text())))
        return 0

    import onnxruntime  # noqa: F401 - fail early where the builder extra is missing
    if "transformers" in args.systems:
        from transformers.utils.import_utils import is_serve_available
        if not is_serve_available():  # found out only at (c)'s turn, some minutes into the run, otherwise
            parser.error("transformers serve lacks its serving dependencies (fastapi, uvicorn, openai): install the "
                         "bench extra (pip install -e '.[bench]', as make bench does), or leave transformers out of "
                         "--systems")
    from tokenizers import Tokenizer

    from deepseek_local import local
    from deepseek_model_repository import write_repository
    from deepseek_model_repository.repository import ModelNames
    from deepseek_model_repository.serving.runners import open_runner

    import legacy

    began = time.time()
    load_before = os.getloadavg()
    cache_dir = Path(args.cache_dir or local.default_cache_dir())
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    workload = Workload()
    prompts = workload.prompts()
    result: dict[str, Any] = {
        "slots": SLOTS, "capacity": CAPACITY, "seconds_per_level": args.seconds, "rounds": args.rounds,
        "settle_seconds_per_round": args.settle, "concurrency": args.concurrency,
        "workload": {"seed": workload.seed, "prompts": workload.pool, "max_tokens": list(MAX_TOKENS_RANGE),
                     "short_max_tokens": SHORT_MAX_TOKENS, "short_share": SHORT_SHARE, "decoding": "greedy",
                     "client": "closed loop, streaming (gRPC for Triton, SSE for transformers)",
                     "triton_streams": "one per request" if args.per_request_streams else "one per client"},
        "models": {}, "rows": [], "notes": [],
    }

    # ---- engines: format 2 (served, bare, step timing) and the previous path's format 1
    engines: dict[str, dict[str, Any]] = {}
    legacy_export = legacy_repo = None
    if "previous" in args.systems or not args.no_step:
        try:
            legacy_export, legacy_repo = legacy.reconstruct(ROOT, work)
        except legacy.LegacyUnavailable as exc:
            result["notes"].append(f"baseline (a) skipped: {exc}")
            log(f"baseline (a) skipped: {exc}")
    for arch in args.archs:
        resource, model_dir = tiny_resource(cache_dir, f"bench-{arch.replace('_', '-')}", arch, SLOTS, CAPACITY)
        log(f"{arch}: engine (slots {SLOTS}, capacity {CAPACITY})")
        engine_dir = local.build_engine(resource, cache_dir, echo=lambda _: None)
        e: dict[str, Any] = {"model_dir": model_dir, "engine_dir": engine_dir,
                             "info": json.loads((engine_dir / "model-info.json").read_text())}
        if not args.no_step:
            long_resource, _ = tiny_resource(cache_dir, f"bench-{arch.replace('_', '-')}-long", arch, STEP_ROWS,
                                             LONG_CAPACITY)
            log(f"{arch}: engine (slots {STEP_ROWS}, capacity {LONG_CAPACITY}) for the step timing")
            e["long_engine_dir"] = local.build_engine(long_resource, cache_dir, echo=lambda _: None)
        if legacy_export is not None:
            log(f"{arch}: format-1 engine of the previous path (export from {legacy.COMMIT})")
            e["legacy_dir"] = legacy.export_engine(legacy_export, model_dir, engine_dir, work / f"v1-{arch}", SLOTS,
                                                   CAPACITY)
        tokenizer = Tokenizer.from_file(str(engine_dir / e["info"].get("tokenizer_dir", "tokenizer") /
                                            "tokenizer.json"))
        e["prompt_ids"] = [tokenizer.encode(p).ids for p in prompts]
        lengths = [len(ids) for ids in e["prompt_ids"]]
        result["models"][arch] = {"description": ARCHS[arch], "engine_dir": str(engine_dir),
                                  "prompt_tokens": {"min": min(lengths), "median": float(np.median(lengths)),
                                                    "max": max(lengths)}}
        engines[arch] = e

    rows: list[dict[str, Any]] = result["rows"]
    servers = contextlib.ExitStack()
    with servers:
        # ---- (1) in-flight and (a) previous: one local Triton serving both paths of both models
        senders: dict[tuple[str, str], Any] = {}
        served = {"inflight", "inflight-unary", "inflight-paced", "previous"} & set(args.systems)
        if legacy_repo is None:
            served.discard("previous")
        triton_models: dict[tuple[str, str], str] = {}
        #: The model label of the scheduler's metrics for each system that has one (the client-facing name).
        scheduler_labels: dict[tuple[str, str], str] = {}
        #: The model whose process runs the engine, for each system (where it is not the one the clients call).
        scheduler_models: dict[tuple[str, str], str] = {}
        if served:
            repo = work / "repository"
            ready: list[str] = []
            for arch, e in engines.items():
                base = f"bench-{arch.replace('_', '-')}"
                if {"inflight", "inflight-unary"} & served:
                    write_repository(e["engine_dir"], repo, base, runtime="local")
                    if "inflight" in args.systems:
                        triton_models[(arch, "inflight")] = f"{base}_stream"
                        scheduler_labels[(arch, "inflight")] = base
                    if "inflight-unary" in args.systems:
                        triton_models[(arch, "inflight-unary")] = base
                        scheduler_labels[(arch, "inflight-unary")] = base
                        scheduler_models[(arch, "inflight-unary")] = f"{base}_stream"
                    ready += [base, f"{base}_stream"]
                if "inflight-paced" in served:
                    write_repository(e["engine_dir"], repo, f"{base}-paced", runtime="local",
                                     stream_interval=PACED_INTERVAL)
                    triton_models[(arch, "inflight-paced")] = f"{base}-paced_stream"
                    scheduler_labels[(arch, "inflight-paced")] = f"{base}-paced"
                    ready += [f"{base}-paced", f"{base}-paced_stream"]
                if "previous" in served:
                    # No preferred sizes: the previous path batches up to maxBatchSize, its best case here.
                    legacy_repo.write_repository(e["legacy_dir"], repo, f"{base}-previous", runtime="local",
                                                 max_queue_delay_us=2000)
                    triton_models[(arch, "previous")] = f"{base}-previous_stream"
                    scheduler_models[(arch, "previous")] = f"{base}-previous_engine"
                    ready += [f"{base}-previous", f"{base}-previous_stream", f"{base}-previous_engine"]
            server_name = f"bench-serving-{os.getpid()}"
            log(f"starting Triton with {len(ready)} models")
            # The server's folder (its backends and log) and lock go with it: each run's name is new.
            servers.callback((local.state_dir(cache_dir) / f"{server_name}.lock").unlink, missing_ok=True)
            servers.callback(shutil.rmtree, local.state_dir(cache_dir) / server_name, ignore_errors=True)
            server = local.serve_repository(server_name, repo, cache_dir, models=ready, http_port=0, grpc_port=0,
                                            metrics_port=0)
            servers.callback(local.down_name, server_name, cache_dir)

        # ---- (c) transformers serve --continuous-batching: Qwen2 measured, V3 tried (its failure recorded)
        tservers: dict[str, TransformersServe] = {}
        if "transformers" in args.systems:
            result["transformers"] = {}
            for arch, e in engines.items():
                log(f"{arch}: starting transformers serve --continuous-batching")
                serve = TransformersServe(e["model_dir"], work / f"transformers-{arch}.log")
                servers.callback(serve.stop)
                outcome: dict[str, Any] = {"command": " ".join(("transformers serve", *serve.FLAGS, "<checkpoint>")),
                                           "failed": False}
                try:
                    serve.wait_ready()
                    error = asyncio.run(probe_openai(serve.url, str(e["model_dir"]), prompts[0]))
                except Exception as exc:  # noqa: BLE001 - recorded
                    error = f"{type(exc).__name__}: {exc}"
                if error:
                    time.sleep(0.5)
                    outcome.update(failed=True, error=error, server_log_error=first_error_line(serve.log_tail(60)))
                    log(f"{arch}: transformers serve failed: {error} | {outcome['server_log_error']}")
                    serve.stop()
                else:
                    tservers[arch] = serve
                result["transformers"][arch] = outcome

        # ---- (b) the bare engine loop: the same scheduler and runner in this process
        runners: dict[str, BareWorker] = {}
        if {"bare", "inflight-unary", "inflight-paced"} & set(args.systems):
            for arch, e in engines.items():
                runners[arch] = BareWorker(e["engine_dir"], e["prompt_ids"], workload)
                servers.callback(runners[arch].close)
                if {(arch, "inflight-unary"), (arch, "inflight-paced")} & set(triton_models):
                    lengths = runners[arch].greedy_lengths(MAX_TOKENS_RANGE[1])
                    e["greedy_lengths"] = dict(zip(prompts, lengths))
                    result["models"][arch]["greedy_tokens_per_prompt"] = {
                        "min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}

        async def run_all() -> None:
            closers = []
            for (arch, system), model in triton_models.items():
                if system == "inflight-unary":
                    send, close = unary_sender(server.endpoints["grpc"], model, engines[arch]["greedy_lengths"])
                elif system == "inflight-paced":
                    send, close = triton_sender(server.endpoints["grpc"], model, PACED_INTERVAL,
                                                engines[arch]["greedy_lengths"],
                                                persistent=not args.per_request_streams)
                else:
                    send, close = triton_sender(server.endpoints["grpc"], model,
                                                persistent=not args.per_request_streams)
                senders[(arch, system)] = send
                closers.append(close)
            for arch, serve in tservers.items():
                send, close = openai_sender(serve.url, str(engines[arch]["model_dir"]))
                senders[(arch, "transformers")] = send
                closers.append(close)
            try:
                for arch, e in engines.items():
                    systems = [s for s in SYSTEMS if (arch, s) in senders or (s == "bare" and s in args.systems)]

                    def cpu_now(system: str) -> dict[str, float]:
                        if system == "transformers":
                            return {TRANSFORMERS_ROLE: cpu_seconds(tservers[arch].process.pid),
                                    "client": cpu_seconds(os.getpid())}
                        model = triton_models[(arch, system)]
                        return cpu_by_role(server.pid, scheduler_models.get((arch, system), model),
                                           model if system == "inflight-unary" else None)

                    async def level(system: str, concurrency: int, seconds: float, settle: float = 0.0) -> Window:
                        if system == "bare":
                            return runners[arch].level(concurrency, seconds, settle)
                        label = scheduler_labels.get((arch, system))
                        before = await scrape_engine(server.endpoints["metrics"], label) if label else {}
                        cpu_before = cpu_now(system)
                        w = await closed_loop(senders[(arch, system)], prompts, workload, concurrency, seconds,
                                              settle)
                        w.cpu = cpu_delta(cpu_before, cpu_now(system))
                        if label:
                            w.engine = engine_delta(before, await scrape_engine(server.endpoints["metrics"], label))
                        return w

                    for system in systems:  # warm-up: sessions, caches, allocators, the batch sizes to come
                        for c in sorted({1, max(args.concurrency)}):
                            await level(system, c, args.warmup)
                    # Rounds interleave the systems, so load from elsewhere on the machine hits them alike.
                    windows: dict[tuple[str, int], list[Window]] = {}
                    for round_index in range(args.rounds):
                        for c in args.concurrency:
                            for system in systems:
                                w = await level(system, c, args.seconds / args.rounds, args.settle)
                                windows.setdefault((system, c), []).append(w)
                                log(f"  {arch:<11} {system:<12} c={c:<3} round {round_index + 1}: "
                                    f"{w.tokens_per_s:8.1f} tok/s")
                    for system in systems:
                        for c in args.concurrency:
                            rows.append({"model": arch, "system": system, "concurrency": c,
                                         **summarize(windows[(system, c)])})
            finally:
                for close in closers:
                    await close()

        try:
            asyncio.run(run_all())
        except Exception:
            if served:  # what the server says, before its folder goes with this block
                # The threads of this project's text-generation models, printed to the log (serving/triton.py); the
                # previous path's models have no such handler, and the signal would end them.
                current = {m for models in (triton_models, scheduler_models) for (_, system), m in models.items()
                           if system != "previous"}
                for pid in children(server.pid):
                    if stub_model(pid) in current:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGUSR1)
                time.sleep(1.0)
                log("the run failed; Triton's log ends:\n  " + "\n  ".join(
                    Path(server.log).read_text(errors="replace").splitlines()[-400:]))
                with contextlib.suppress(Exception):
                    import urllib.request

                    with urllib.request.urlopen(server.endpoints["metrics"], timeout=10) as r:
                        log("the scheduler's series then:\n  " + "\n  ".join(
                            line for line in r.read().decode().splitlines()
                            if line.startswith("deepseek_scheduler_") and "_bucket" not in line))
            raise
        if served and any(r["errors"] and r["system"] != "transformers" for r in rows):
            # Said now: the server's folder, its log with it, goes when this block ends.
            tail = Path(server.log).read_text(errors="replace").splitlines()[-15:]
            result["notes"].append("Triton answered errors; its log ended: " + " | ".join(tail))
            log("Triton answered errors; its log ends:\n  " + "\n  ".join(tail))

    # ---- decode step time at ~2,000 against ~50 tokens of context
    if not args.no_step:
        result["decode_step"] = {"rows": STEP_ROWS, "contexts": [50, 2000], "capacity": LONG_CAPACITY}
        for arch, e in engines.items():
            log(f"{arch}: decode step time, {STEP_ROWS} rows")
            runner = open_runner(e["long_engine_dir"], json.loads((e["long_engine_dir"] / "model-info.json").read_text()),
                                 slots=STEP_ROWS, capacity=LONG_CAPACITY)
            entry: dict[str, Any] = {"inflight_runner_ms": step_times(runner, [50, 2000], args.step_repeats)}
            del runner
            if e.get("legacy_dir"):
                entry["previous_engine"] = legacy_step_times(e["legacy_dir"], STEP_ROWS, [50, 2000], args.step_repeats)
            result["decode_step"][arch] = entry

    # ---- targets
    by = {(r["model"], r["system"], r["concurrency"]): r for r in rows}
    targets: list[dict[str, Any]] = []
    for arch in engines:
        for system, how in (("inflight", "streamed"), ("inflight-unary", "plain requests"),
                            ("inflight-paced", f"streamed, streamInterval {PACED_INTERVAL}")):
            for c in args.concurrency:
                mine, bare = by.get((arch, system, c)), by.get((arch, "bare", c))
                if mine and bare and bare["tokens_per_s"]:
                    ratio = mine["tokens_per_s"] / bare["tokens_per_s"]
                    targets.append({"target": f"tokens/s ({how}) >= 0.85 x bare engine loop", "model": arch,
                                    "concurrency": c, "value": round(ratio, 3), "pass": ratio >= 0.85})
        for c in args.concurrency:
            mine, peer = by.get((arch, "inflight", c)), by.get((arch, "transformers", c))
            if mine and peer and peer["short_p50_ms"] and mine["short_p50_ms"]:
                ratio = mine["short_p50_ms"] / peer["short_p50_ms"]
                targets.append({"target": "short-request p50 <= 1.2 x transformers serve --continuous-batching",
                                "model": arch, "concurrency": c, "value": round(ratio, 3), "pass": ratio <= 1.2})
        top = max(args.concurrency)
        mine, prev = by.get((arch, "inflight", top)), by.get((arch, "previous", top))
        if mine and prev and prev["tokens_per_s"]:
            ratio = mine["tokens_per_s"] / prev["tokens_per_s"]
            targets.append({"target": f"tokens/s at concurrency {top} >= previous path", "model": arch,
                            "concurrency": top, "value": round(ratio, 3), "pass": ratio >= 1.0})
    result["targets"] = targets
    result["machine"] = {**machine_info(), "load_average_before": [round(x, 2) for x in load_before],
                         "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    result["total_seconds"] = round(time.time() - began, 1)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print_report(result)
    print(f"wrote {args.output}")
    return 0


def markdown_report(result: dict[str, Any]) -> str:
    """The README's tables, from a results file."""
    def cell(v, digits=0):
        return "-" if v is None else f"{v:,.{digits}f}"

    idle = any(r.get("tokens_per_s_from_idle") is not None for r in result["rows"])
    lines = ["| model | system | clients | tokens/s " + ("| from idle " if idle else "")
             + "| TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | short p50 |",
             "|---|---|---|---" + ("|---" if idle else "") + "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['system']} | {r['concurrency']} | {cell(r['tokens_per_s'])} | "
                     + (f"{cell(r.get('tokens_per_s_from_idle'))} | " if idle else "")
                     + f"{cell(r['ttft_p50_ms'], 1)} | {cell(r['ttft_p99_ms'], 1)} | {cell(r['itl_p50_ms'], 1)} | "
                     f"{cell(r['itl_p99_ms'], 1)} | {cell(r['short_p50_ms'], 1)} |")
    lines.append("")
    timed = [r for r in result["rows"] if r.get("engine_decode_step_ms") is not None]
    if timed:
        bare = {(r["model"], r["concurrency"]): r for r in timed if r["system"] == "bare"}
        lines += ["| model | system | clients | decode step | x bare | prefill | engine busy |",
                  "|---|---|---|---|---|---|---|"]
        for r in timed:
            ref = bare.get((r["model"], r["concurrency"]))
            ratio = (f"x{r['engine_decode_step_ms'] / ref['engine_decode_step_ms']:.2f}"
                     if ref and ref["engine_decode_step_ms"] else "-")
            lines.append(f"| {r['model']} | {r['system']} | {r['concurrency']} | {cell(r['engine_decode_step_ms'], 2)} ms"
                         f" | {ratio} | {cell(r['engine_prefill_ms'], 2)} ms | {cell(r['engine_busy'], 2)} |")
        lines.append("")
    used = [r for r in result["rows"] if r.get("cpu_cores")]
    if used:
        roles = [role for role in (BARE_ROLE, TRANSFORMERS_ROLE, *CPU_ROLES) if any(role in r["cpu_cores"] for r in used)]
        lines += ["| model | system | clients | " + " | ".join(roles) + " | all | CPU ms per 1k tokens |",
                  "|---|---|---" + "|---" * (len(roles) + 2) + "|"]
        for r in used:
            total = sum(r["cpu_cores"].values())
            per_k = total / r["tokens_per_s"] * 1e6 if r.get("tokens_per_s") else None
            lines.append(f"| {r['model']} | {r['system']} | {r['concurrency']} | "
                         + " | ".join(cell(r["cpu_cores"].get(role), 2) for role in roles)
                         + f" | {cell(total, 2)} | {cell(per_k)} |")
        lines.append("")
    step = result.get("decode_step")
    if step:
        lines += [f"| decode step, {step['rows']} rows | context 50 | context 2,000 | x |", "|---|---|---|---|"]
        for arch in ARCHS:
            if arch not in step:
                continue
            entries = [("in-flight runner", step[arch]["inflight_runner_ms"])]
            prev = step[arch].get("previous_engine")
            if prev:
                entries += [("previous engine", prev["engine_ms"]), ("previous + row copies", prev["with_copies_ms"])]
            for label, v in entries:
                lines.append(f"| {arch} {label} | {v['50']:.2f} ms | {v['2000']:.2f} ms | "
                             f"x{v['2000'] / v['50']:.2f} |")
        lines.append("")
    lines += ["| target | model | clients | ratio | |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['model']} | {t['concurrency']} | {t['value']:.2f} | "
                     f"{'pass' if t['pass'] else '**fail**'} |")
    return "\n".join(lines)


def print_report(result: dict[str, Any]) -> None:
    print()
    print(f"{'model':<12} {'system':<13} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} "
          f"{'p99':>7} {'short p50':>10} {'reqs':>5} {'err':>4}")
    for r in result["rows"]:
        print(f"{r['model']:<12} {r['system']:<13} {r['concurrency']:>4} {fmt(r['tokens_per_s']):>8} "
              f"{fmt(r['ttft_p50_ms']):>9} {fmt(r['ttft_p99_ms']):>8} {fmt(r['itl_p50_ms']):>8} "
              f"{fmt(r['itl_p99_ms']):>7} {fmt(r['short_p50_ms']):>10} {r['requests']:>5} {r['errors']:>4}")
    print("(milliseconds; tokens/s within the measured window)")
    for arch, outcome in result.get("transformers", {}).items():
        if outcome.get("failed"):
            print(f"transformers serve --continuous-batching on {arch}: FAILED: {outcome['error']}"
                  f" | server: {outcome['server_log_error']}")
    step = result.get("decode_step")
    if step:
        print()
        print(f"decode step, {step['rows']} rows (ms):   context 50   context 2000")
        for arch in ARCHS:
            if arch not in step:
                continue
            r = step[arch]["inflight_runner_ms"]
            print(f"  {arch:<11} in-flight runner      {r['50']:>8.2f}   {r['2000']:>8.2f}")
            prev = step[arch].get("previous_engine")
            if prev:
                print(f"  {arch:<11} previous engine       {prev['engine_ms']['50']:>8.2f}   "
                      f"{prev['engine_ms']['2000']:>8.2f}")
                print(f"  {arch:<11} previous + row copies {prev['with_copies_ms']['50']:>8.2f}   "
                      f"{prev['with_copies_ms']['2000']:>8.2f}")
    print()
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['model']} c={t['concurrency']} "
              f"ratio {t['value']}")
    for note in result["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(bare_worker_main() if sys.argv[1:] == ["--bare-worker"] else main())
