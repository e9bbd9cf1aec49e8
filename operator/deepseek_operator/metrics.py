"""The operator's own Prometheus metrics (the chart's dashboard and alerts use these exact names)."""

from __future__ import annotations

import threading
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .conditions import PHASES

#: The operator's registry (not the global one, so several operators in one test process do not collide).
REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "deepseek_operator_reconciles", "Reconciliations of DeepSeekModels, by result (success, invalid, error).",
    ["result"], registry=REGISTRY,
)
BUILDS_STARTED = Counter("deepseek_operator_builds_started", "Engine-build Jobs created.", registry=REGISTRY)
BUILDS_SUCCEEDED = Counter("deepseek_operator_builds_succeeded", "Engine-build Jobs that succeeded.", registry=REGISTRY)
BUILDS_FAILED = Counter("deepseek_operator_builds_failed", "Engine-build Jobs that failed.", registry=REGISTRY)
BUILD_DURATION = Histogram(
    "deepseek_operator_build_duration_seconds", "Run time of successful engine-build Jobs.",
    buckets=(60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 10800),
    registry=REGISTRY,
)
MODELS = Gauge("deepseek_operator_models", "DeepSeekModels by status.phase.", ["phase"], registry=REGISTRY)

_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}


def record_phase(namespace: str, name: str, phase: Optional[str]) -> None:
    """Remember a model's phase (None forgets it) and refresh the per-phase gauge."""
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase
        counts = {p: 0 for p in PHASES}
        for value in _phases.values():
            counts[value] = counts.get(value, 0) + 1
        for p, n in counts.items():
            MODELS.labels(phase=p).set(n)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on ``port`` (0 disables)."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
