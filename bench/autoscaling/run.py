"""Autoscaling on GPU utilization against the Triton queue ratio, through Kubernetes' HPA algorithm.

A load trace (a step and a burst) is replayed through a simulation of the whole loop:

* **Replicas**: each Triton replica runs dynamic batches of up to ``B`` requests that take ``E`` seconds
  (so it serves ``mu = B / E`` requests/s saturated), from one FIFO queue (the Service spreads load);
  Poisson arrivals. ``mu``, ``B`` and ``E`` come from bench/results/batching.json (the serving
  benchmark's measured per-replica service rate, its max batch size and the mean batch at its highest
  concurrency); without that file, a documented default is used and the output says so. A new replica
  serves after ``--startup`` seconds (image pulled, engine loaded).
* **Signals**: DCGM's ``DCGM_FI_DEV_GPU_UTIL`` is the duty cycle over the last second, sampled every
  ``dcgm_s``; Triton's counters ``nv_inference_queue_duration_us`` / ``nv_inference_compute_infer_duration_us``
  are cumulative. Prometheus scrapes both every ``scrape_s`` (random phases); the queue ratio is
  ``rate(queue)/rate(compute)`` over ``window_s``. prometheus-adapter and KEDA query Prometheus when the
  HPA asks (``cache_s`` models KEDA's useCachedMetrics); the HPA syncs every 15 s.
* **HPA**: Kubernetes' documented algorithm (pkg/controller/podautoscaler): per metric
  ``ceil(replicas * value / target)`` with tolerance 0.1 and the missing-pod rule (pods without a metric
  count as 0 when scaling up, as the target when scaling down), the max over metrics, then the
  stabilization windows (min of recent recommendations up, max down), then the policies' rate limits
  with the select policy, then min/maxReplicas.

Reported per trace, signal and behavior: time from the load step to the first scale-up decision and to
the first added replica serving, p99 latency, replica-minutes, and flaps (a scale-down undone by a
scale-up within 10 minutes). Writes bench/results/autoscaling.json and prints the table; the behavior
defaults in operator/deepseek_operator/autoscaling.py are chosen from it (docs/autoscaling.md cites the numbers).

    python bench/autoscaling/run.py                 # all traces, signals, pipelines and behaviors
    python bench/autoscaling/run.py --seeds 10      # more seeds per cell (mean of the metrics)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BATCHING = ROOT / "bench" / "results" / "batching.json"
RESULTS = ROOT / "bench" / "results" / "autoscaling.json"

#: Used only when bench/results/batching.json is absent: a batch of 1 in 80 ms, a batch of 8 in 200 ms.
DEFAULT_SERVICE = {"mu": 40.0, "batch": 8, "exec_1_s": 0.08, "exec_s": 0.2,
                   "source": "default (no bench/results/batching.json)"}

HPA_SYNC_S = 15.0
TOLERANCE = 0.1
DT = 0.05
FLAP_WINDOW_S = 600.0


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Policy:
    type: str  # "Pods" or "Percent"
    value: int
    period_s: int


@dataclass(frozen=True)
class Rules:
    window_s: int
    select: str  # "Max", "Min", "Disabled"
    policies: tuple[Policy, ...]


@dataclass(frozen=True)
class Behavior:
    name: str
    up: Rules
    down: Rules


@dataclass(frozen=True)
class Pipeline:
    """Intervals of the metrics path."""

    name: str
    dcgm_s: float  # DCGM exporter collect interval
    scrape_s: float  # Prometheus scrape interval (Triton and DCGM exporter)
    window_s: float  # rate window of the queue ratio
    cache_s: float = 0.0  # adapter / KEDA metric cache (0: query on each HPA sync)


@dataclass(frozen=True)
class Signal:
    name: str
    gpu_target: Optional[float]  # percent
    queue_target: Optional[float]  # queue time / compute time


@dataclass
class Service:
    """A replica: batches of up to ``batch`` requests; one request takes ``exec_1_s``, a full batch ``exec_s``."""

    mu: float
    batch: int
    exec_1_s: float
    exec_s: float
    source: str

    def exec_time(self, n: int) -> float:
        """Execution time of a batch of ``n``: linear between a batch of one and a full batch."""
        if self.batch <= 1:
            return self.exec_s
        return self.exec_1_s + (self.exec_s - self.exec_1_s) * (n - 1) / (self.batch - 1)


@dataclass
class Trace:
    name: str
    rate: Callable[[float], float]  # requests/s at time t
    duration_s: float
    step_at_s: float  # when the load first rises


# ---------------------------------------------------------------- the HPA
@dataclass
class HPA:
    """Kubernetes' HPA controller for one target, as documented (autoscaling/v2, behavior)."""

    min_replicas: int
    max_replicas: int
    behavior: Behavior
    recommendations: list = field(default_factory=list)  # (time, replicas)
    scale_events: list = field(default_factory=list)  # (time, delta)

    def metric_replicas(self, current: int, value: float, target: float, with_metric: int) -> int:
        """Replicas one Pods metric asks for (replica_calculator.calcPlainMetricReplicas)."""
        if with_metric <= 0:
            return current
        missing = max(0, current - with_metric)
        ratio = value / target
        if missing == 0:
            if abs(ratio - 1.0) <= TOLERANCE:
                return current
            return math.ceil(ratio * with_metric)
        if ratio > 1.0:  # scaling up: pods without the metric count as using nothing
            new_ratio = value * with_metric / (target * (with_metric + missing))
        else:  # scaling down: they count as exactly at target
            new_ratio = (value * with_metric + target * missing) / (target * (with_metric + missing))
        if abs(new_ratio - 1.0) <= TOLERANCE or (ratio > 1.0) != (new_ratio > 1.0):
            return current
        return math.ceil(new_ratio * (with_metric + missing))

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        up_cut, down_cut = now - self.behavior.up.window_s, now - self.behavior.down.window_s
        up_rec = down_rec = desired
        for t, rec in self.recommendations:
            if t > up_cut:
                up_rec = min(up_rec, rec)
            if t > down_cut:
                down_rec = max(down_rec, rec)
        self.recommendations.append((now, desired))
        keep = max(self.behavior.up.window_s, self.behavior.down.window_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep]
        rec = current
        if rec < up_rec:
            rec = up_rec
        if rec > down_rec:
            rec = down_rec
        return rec

    def _changed_in(self, now: float, period: float, up: bool) -> int:
        return sum(abs(d) for t, d in self.scale_events if t > now - period and (d > 0) == up)

    def _up_limit(self, now: float, current: int) -> int:
        rules = self.behavior.up
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - self._changed_in(now, p.period_s, up=True)
            limits.append(start + p.value if p.type == "Pods" else math.ceil(start * (1 + p.value / 100)))
        return max(limits) if rules.select == "Max" else min(limits)

    def _down_limit(self, now: float, current: int) -> int:
        rules = self.behavior.down
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current + self._changed_in(now, p.period_s, up=False)
            limits.append(start - p.value if p.type == "Pods" else int(start * (1 - p.value / 100)))
        # Max picks the policy allowing the biggest change: the lowest floor.
        return min(limits) if rules.select == "Max" else max(limits)

    def decide(self, now: float, current: int, desired: int) -> int:
        desired = self._stabilize(now, current, desired)
        if desired > current:
            desired = min(desired, self._up_limit(now, current), self.max_replicas)
        elif desired < current:
            desired = max(desired, self._down_limit(now, current), self.min_replicas)
        desired = min(max(desired, self.min_replicas), self.max_replicas)
        if desired != current:
            self.scale_events.append((now, desired - current))
            horizon = max([p.period_s for p in self.behavior.up.policies + self.behavior.down.policies] or [0])
            self.scale_events = [(t, d) for t, d in self.scale_events if t > now - horizon]
        return desired


# ---------------------------------------------------------------- the simulation
def simulate(trace: Trace, signal: Signal, pipeline: Pipeline, behavior: Behavior, service: Service,
             min_replicas: int, max_replicas: int, startup_s: float, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    phase = {k: rng.uniform(0, v) for k, v in
             (("dcgm", pipeline.dcgm_s), ("scrape", pipeline.scrape_s), ("hpa", HPA_SYNC_S))}
    hpa = HPA(min_replicas, max_replicas, behavior)

    replicas: list[dict] = [{"ready_at": 0.0, "busy_until": 0.0, "busy_log": deque()} for _ in range(min_replicas)]
    queue: deque = deque()  # [arrival_time, count]
    queued = 0
    latencies: list[float] = []
    weights: list[int] = []
    queue_us = compute_us = 0.0

    dcgm_samples: deque = deque(maxlen=4)  # (t, util %, pods ready at t)
    scrapes: deque = deque()  # (t, dcgm value, pods with dcgm, queue_us, compute_us, pods ready)
    cached = None  # (t, metrics) for cache_s
    next_dcgm, next_scrape, next_hpa = phase["dcgm"], phase["scrape"], phase["hpa"]

    replica_seconds = 0.0
    events: list[tuple[float, int, int]] = []  # (t, from, to)
    first_up_decision = first_up_ready = None
    timeline = []

    steps = int(trace.duration_s / DT)
    for i in range(steps):
        now = i * DT
        # arrivals
        n = int(rng.poisson(trace.rate(now) * DT))
        if n:
            queue.append([now, n])
            queued += n
        # idle ready replicas take up to B queued requests
        # (a replica that frees up inside this tick starts its next batch at that instant, not at the next
        # tick: rounding starts up to DT would idle it for part of every batch and understate its utilization)
        for r in replicas:
            free_at = max(r["ready_at"], r["busy_until"])
            if free_at < now + DT and queued:
                start = max(free_at, now)
                take = min(service.batch, queued)
                exec_s = service.exec_time(take)
                left = take
                while left:
                    head = queue[0]
                    k = min(left, head[1])
                    wait = start - head[0]
                    latencies.append(wait + exec_s)
                    weights.append(k)
                    queue_us += k * wait * 1e6
                    compute_us += k * exec_s * 1e6
                    head[1] -= k
                    left -= k
                    if head[1] == 0:
                        queue.popleft()
                queued -= take
                r["busy_until"] = start + exec_s
                r["busy_log"].append((start, start + exec_s))
        replica_seconds += len(replicas) * DT

        # DCGM: duty cycle over the last second, averaged over the ready replicas
        if now >= next_dcgm:
            ready = [r for r in replicas if r["ready_at"] <= now]
            utils = []
            for r in ready:
                log = r["busy_log"]
                while log and log[0][1] < now - 1.0:
                    log.popleft()
                busy = sum(min(e, now) - max(s, now - 1.0) for s, e in log if e > now - 1.0 and s < now)
                utils.append(100.0 * max(0.0, min(1.0, busy)))
            dcgm_samples.append((now, float(np.mean(utils)) if utils else 0.0, len(ready)))
            next_dcgm += pipeline.dcgm_s
        # Prometheus scrape
        if now >= next_scrape:
            d = dcgm_samples[-1] if dcgm_samples else (now, 0.0, 0)
            ready_now = sum(1 for r in replicas if r["ready_at"] <= now)
            scrapes.append((now, d[1], d[2], queue_us, compute_us, ready_now))
            while scrapes and scrapes[0][0] < now - max(pipeline.window_s, 300.0):
                scrapes.popleft()
            next_scrape += pipeline.scrape_s
        # HPA sync
        if now >= next_hpa:
            next_hpa += HPA_SYNC_S
            if cached is not None and now - cached[0] < pipeline.cache_s:
                metrics = cached[1]
            else:
                metrics = _query(scrapes, now, pipeline)
                cached = (now, metrics)
            current = len(replicas)
            wanted = []
            if signal.gpu_target is not None and metrics["gpu"] is not None:
                wanted.append(hpa.metric_replicas(current, metrics["gpu"], signal.gpu_target, metrics["gpu_pods"]))
            if signal.queue_target is not None and metrics["ratio"] is not None:
                wanted.append(hpa.metric_replicas(current, metrics["ratio"], signal.queue_target,
                                                  metrics["ratio_pods"]))
            desired = max(wanted) if wanted else current
            new = hpa.decide(now, current, desired)
            if new > current:
                if first_up_decision is None and now >= trace.step_at_s:
                    first_up_decision = now
                replicas += [{"ready_at": now + startup_s, "busy_until": 0.0, "busy_log": deque()}
                             for _ in range(new - current)]
                if first_up_ready is None and now >= trace.step_at_s:
                    first_up_ready = now + startup_s
                events.append((now, current, new))
            elif new < current:
                # Kubernetes removes pods that are not ready first, then the youngest.
                replicas.sort(key=lambda r: (r["ready_at"] <= now, -r["ready_at"]))
                del replicas[: current - new]
                events.append((now, current, new))
            timeline.append((round(now, 1), len(replicas), None if metrics["gpu"] is None else round(metrics["gpu"], 1),
                             None if metrics["ratio"] is None else round(metrics["ratio"], 3)))

    # requests still queued at the end count with their wait so far
    end = steps * DT
    for t0, k in queue:
        latencies.append(end - t0 + service.exec_time(service.batch))
        weights.append(k)
    p99 = _weighted_quantile(np.array(latencies), np.array(weights), 0.99)
    p50 = _weighted_quantile(np.array(latencies), np.array(weights), 0.50)
    flaps = sum(1 for i, (t, a, b) in enumerate(events) if b < a and any(
        b2 > a2 and t < t2 <= t + FLAP_WINDOW_S for t2, a2, b2 in events[i + 1:]))
    return {
        "first_scale_up_decision_s": None if first_up_decision is None else round(first_up_decision - trace.step_at_s, 1),
        "first_scale_up_ready_s": None if first_up_ready is None else round(first_up_ready - trace.step_at_s, 1),
        "p50_ms": round(p50 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "replica_minutes": round(replica_seconds / 60, 1),
        "max_replicas_used": max([b for _, _, b in events] + [min_replicas]),
        "scale_events": len(events),
        "flaps": flaps,
        "timeline": timeline,
    }


def _query(scrapes: deque, now: float, pipeline: Pipeline) -> dict[str, Any]:
    """What prometheus-adapter (or KEDA) answers: the last GPU sample, and rate(queue)/rate(compute)."""
    if not scrapes:
        return {"gpu": None, "gpu_pods": 0, "ratio": None, "ratio_pods": 0}
    last = scrapes[-1]
    in_window = [s for s in scrapes if s[0] > now - pipeline.window_s]
    ratio, ratio_pods = None, 0
    if len(in_window) >= 2:
        first, last_w = in_window[0], in_window[-1]
        d_compute = last_w[4] - first[4]
        ratio = (last_w[3] - first[3]) / max(d_compute, 1.0)
        ratio_pods = first[5]  # a pod needs two samples in the window to have a rate
    return {"gpu": last[1], "gpu_pods": last[2], "ratio": ratio, "ratio_pods": ratio_pods}


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if values.size == 0:
        return 0.0
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


# ---------------------------------------------------------------- inputs
def load_service(path: Path = BATCHING) -> Service:
    """The per-replica service rate measured by bench/batching/run.py, or the documented default."""
    if not path.exists():
        return Service(**DEFAULT_SERVICE)
    data = json.loads(path.read_text())
    mu = float(data["service_rate_rps"])
    top = data.get("service_rate_concurrency")
    batch = int(data.get("max_batch_size") or 8)
    rows = [r for r in data.get("results", []) if r.get("dynamic_batching")]
    mean_batch = next((r.get("mean_batch") for r in rows if r.get("concurrency") == top), None) or batch
    # At saturation one execution serves the mean batch: it takes mean_batch / mu. A lone request takes the
    # p50 latency at concurrency 1. Extrapolate linearly to a full batch.
    exec_mean = float(mean_batch) / mu
    lone = [r for r in rows if r.get("concurrency") == 1]
    exec_1 = float(lone[0]["p50_ms"]) / 1000 if lone else exec_mean
    exec_1 = min(exec_1, exec_mean)
    slope = (exec_mean - exec_1) / (float(mean_batch) - 1) if mean_batch > 1 else 0.0
    exec_full = exec_1 + slope * (batch - 1)
    return Service(mu=batch / exec_full, batch=batch, exec_1_s=exec_1, exec_s=exec_full,
                   source=f"{path.relative_to(ROOT)} (measured {data.get('measured_at', '?')}, model {data.get('model')})")


def traces(mu: float) -> list[Trace]:
    """Loads in units of one replica's capacity ``mu``."""
    def step(t: float) -> float:
        return mu * (3.5 if 120 <= t < 900 else 0.5)

    def burst(t: float) -> float:
        in_burst = any(start <= t < start + 60 for start in (240, 540, 840, 1140))
        return mu * (2.5 if in_burst else 0.5)

    return [Trace("step", step, 1800, 120), Trace("burst", burst, 1500, 240)]


SIGNALS = [
    Signal("gpu-utilization", gpu_target=70, queue_target=None),
    Signal("queue-ratio", gpu_target=None, queue_target=0.5),
    Signal("gpu+queue", gpu_target=70, queue_target=0.5),
    Signal("gpu+queue1.0", gpu_target=70, queue_target=1.0),
]
PIPELINES = [
    Pipeline("default", dcgm_s=30, scrape_s=30, window_s=120),
    Pipeline("chart-default", dcgm_s=15, scrape_s=15, window_s=60),
    Pipeline("fast", dcgm_s=5, scrape_s=5, window_s=20),
    Pipeline("fast+keda-cache", dcgm_s=5, scrape_s=5, window_s=20, cache_s=15),
]


def behaviors() -> list[Behavior]:
    up_fast = Rules(0, "Max", (Policy("Percent", 100, 15), Policy("Pods", 4, 15)))
    k8s_default = Behavior("k8s-default", up_fast, Rules(300, "Max", (Policy("Percent", 100, 15),)))
    out = [k8s_default]
    for window in (60, 180, 300, 600):
        out.append(Behavior(f"down{window}s-1pod/min", up_fast, Rules(window, "Max", (Policy("Pods", 1, 60),))))
    out.append(Behavior("up30s-down300s-1pod/min", Rules(30, "Max", up_fast.policies),
                        Rules(300, "Max", (Policy("Pods", 1, 60),))))
    return out


# ---------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per cell (metrics are averaged)")
    parser.add_argument("--startup", type=float, default=60.0, help="seconds before a new replica serves")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    service = load_service()
    print(f"service: mu={service.mu:.2f} req/s per replica (full batches of {service.batch} in "
          f"{service.exec_s * 1000:.0f} ms, one request in {service.exec_1_s * 1000:.0f} ms)  [{service.source}]")
    print(f"replica startup {args.startup:.0f} s, HPA sync {HPA_SYNC_S:.0f} s, tolerance {TOLERANCE}, "
          f"replicas {args.min_replicas}..{args.max_replicas}, {args.seeds} seeds per cell\n")

    rows = []
    started = time.monotonic()
    combos = []
    # Signals x pipelines with the Kubernetes default behavior; then behaviors on the chart-default pipeline.
    for signal in SIGNALS:
        for pipeline in PIPELINES:
            combos.append((signal, pipeline, behaviors()[0]))
    for signal in SIGNALS:
        for behavior in behaviors()[1:]:
            combos.append((signal, PIPELINES[1], behavior))
    for trace in traces(service.mu):
        for signal, pipeline, behavior in combos:
            runs = [simulate(trace, signal, pipeline, behavior, service, args.min_replicas, args.max_replicas,
                             args.startup, seed) for seed in range(args.seeds)]
            rows.append(_summarize(trace, signal, pipeline, behavior, runs))

    header = (f"{'trace':<6} {'signal':<16} {'pipeline':<14} {'behavior':<24} {'1st up':>7} {'ready':>7} "
              f"{'p50 ms':>8} {'p99 ms':>9} {'rep-min':>8} {'max':>4} {'flaps':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['trace']:<6} {r['signal']:<16} {r['pipeline']:<14} {r['behavior']:<24} "
              f"{_fmt(r['first_scale_up_decision_s']):>7} {_fmt(r['first_scale_up_ready_s']):>7} "
              f"{r['p50_ms']:>8.0f} {r['p99_ms']:>9.0f} {r['replica_minutes']:>8.1f} {r['max_replicas_used']:>4.1f} "
              f"{r['flaps']:>5.1f}")

    choice = choose_defaults(rows)
    print(f"\nchosen behavior: {choice['behavior']}  ({choice['why']})")
    result = {
        "service": asdict(service),
        "startup_s": args.startup,
        "hpa_sync_s": HPA_SYNC_S,
        "tolerance": TOLERANCE,
        "replicas": [args.min_replicas, args.max_replicas],
        "seeds": args.seeds,
        "pipelines": [asdict(p) for p in PIPELINES],
        "signals": [asdict(s) for s in SIGNALS],
        "behaviors": {b.name: asdict(b) for b in behaviors()},
        "rows": rows,
        "chosen": choice,
        "elapsed_s": round(time.monotonic() - started, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}s"


def _summarize(trace: Trace, signal: Signal, pipeline: Pipeline, behavior: Behavior, runs: list[dict]) -> dict:
    def mean(key: str) -> Optional[float]:
        vals = [r[key] for r in runs if r[key] is not None]
        return round(float(np.mean(vals)), 1) if vals else None

    return {
        "trace": trace.name, "signal": signal.name, "pipeline": pipeline.name, "behavior": behavior.name,
        **{k: mean(k) for k in ("first_scale_up_decision_s", "first_scale_up_ready_s", "p50_ms", "p99_ms",
                                "replica_minutes", "max_replicas_used", "scale_events", "flaps")},
        "timeline_seed0": runs[0]["timeline"][::4],
    }


#: The configurations the renderer offers: GPU utilization alone (the default) and with the queue ratio.
CHOICE_SIGNALS = ("gpu-utilization", "gpu+queue")


def choose_defaults(rows: list[dict]) -> dict[str, Any]:
    """The behavior with no flaps and the fewest replica-minutes among those whose p99 is within 10% of the
    best p99 of each trace and signal, on the chart-default pipeline, over both traces and CHOICE_SIGNALS."""
    cells = [r for r in rows if r["pipeline"] == "chart-default" and r["signal"] in CHOICE_SIGNALS]
    by_behavior: dict[str, list[dict]] = {}
    for r in cells:
        by_behavior.setdefault(r["behavior"], []).append(r)
    best_p99 = {(r["trace"], r["signal"]): min(x["p99_ms"] for x in cells
                                               if (x["trace"], x["signal"]) == (r["trace"], r["signal"]))
                for r in cells}
    candidates = []
    for name, rs in by_behavior.items():
        flaps = sum(r["flaps"] for r in rs)
        within = all(r["p99_ms"] <= 1.1 * best_p99[(r["trace"], r["signal"])] for r in rs)
        candidates.append((flaps > 0, not within, sum(r["replica_minutes"] for r in rs), name))
    candidates.sort()
    flapping, slow, rep_min, name = candidates[0]
    return {
        "behavior": name,
        "why": f"flaps={'yes' if flapping else 0}, p99 within 10% of best={'no' if slow else 'yes'}, "
               f"replica-minutes (both traces, {' and '.join(CHOICE_SIGNALS)})={rep_min:.1f}",
        "ranking": [{"behavior": n, "flaps": f, "p99_not_within_10pct": s, "replica_minutes": m}
                    for f, s, m, n in candidates],
    }


if __name__ == "__main__":
    sys.exit(main())
