"""The autoscaling bench's HPA follows Kubernetes' documented algorithm, and the renderer's defaults are the
behavior the bench chose."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from deepseek_operator.autoscaling import DEFAULT_SCALE_DOWN, DEFAULT_SCALE_UP

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("autoscaling_bench", ROOT / "bench" / "autoscaling" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()
UP = bench.Rules(0, "Max", (bench.Policy("Percent", 100, 15), bench.Policy("Pods", 4, 15)))
DOWN = bench.Rules(300, "Max", (bench.Policy("Pods", 1, 60),))


def hpa(up=UP, down=DOWN, lo=1, hi=8):
    return bench.HPA(lo, hi, bench.Behavior("t", up, down))


def test_metric_within_tolerance_keeps_replicas():
    assert hpa().metric_replicas(4, 75, 70, 4) == 4  # 7% over target: inside the 0.1 tolerance
    assert hpa().metric_replicas(4, 80, 70, 4) == 5  # ceil(4 * 80 / 70)


def test_pods_without_metrics_damp_scale_up_and_scale_down():
    # Scaling up, missing pods count as 0: 2 pods at 100% and 2 starting -> 100*2/(70*4) < 1: no change.
    assert hpa().metric_replicas(4, 100, 70, 2) == 4
    # Scaling down, missing pods count as at target: 2 pods at 10% and 2 missing -> ceil(4 * 0.57) = 3.
    assert hpa().metric_replicas(4, 10, 70, 2) == 3
    assert hpa().metric_replicas(4, 10, 70, 0) == 4  # no metric at all: no decision


def test_scale_up_policies_with_select_policy():
    assert hpa().decide(0, 2, 20) == 6  # Max of +100% (4) and +4 pods (6)
    assert hpa(up=bench.Rules(0, "Min", UP.policies)).decide(0, 2, 20) == 4
    assert hpa(up=bench.Rules(0, "Disabled", UP.policies)).decide(0, 2, 20) == 2
    assert hpa(hi=5).decide(0, 2, 20) == 5


def test_scale_up_budget_is_shared_within_the_period():
    h = hpa(up=bench.Rules(0, "Max", (bench.Policy("Pods", 2, 60),)))
    assert h.decide(0, 1, 8) == 3
    assert h.decide(15, 3, 8) == 3  # the 2 pods of this 60 s period are spent
    assert h.decide(61, 3, 8) == 5


def test_scale_down_waits_for_the_stabilization_window_then_follows_the_policy():
    h = hpa()
    assert h.decide(0, 4, 4) == 4
    for t in range(15, 300, 15):
        assert h.decide(t, 4, 1) == 4  # the highest recommendation of the last 300 s is still 4
    assert h.decide(301, 4, 1) == 3  # then one pod per 60 s
    assert h.decide(316, 3, 1) == 3
    assert h.decide(362, 3, 1) == 2


def test_scale_up_stabilization_takes_the_lowest_recent_recommendation():
    h = hpa(up=bench.Rules(30, "Max", UP.policies))
    assert h.decide(0, 2, 2) == 2
    assert h.decide(15, 2, 6) == 2  # min(2, 6) over the last 30 s
    assert h.decide(31, 2, 6) == 6


def test_step_load_scales_up_and_back_down():
    service = bench.Service(**{k: v for k, v in bench.DEFAULT_SERVICE.items()})
    trace = bench.Trace("step", lambda t: service.mu * (3.0 if 30 <= t < 240 else 0.3), 720, 30)
    signal = bench.Signal("gpu", 70, None)
    result = bench.simulate(trace, signal, bench.PIPELINES[1], bench.behaviors()[0], service, 1, 8, 30.0, seed=1)
    assert result["first_scale_up_decision_s"] is not None and result["first_scale_up_decision_s"] < 60
    assert result["max_replicas_used"] >= 4
    assert result["timeline"][-1][1] < result["max_replicas_used"]  # scaled back down after the step


def _wire(rules) -> dict:
    return {
        "stabilizationWindowSeconds": rules["window_s"],
        "selectPolicy": rules["select"],
        "policies": [{"type": p["type"], "value": p["value"], "periodSeconds": p["period_s"]} for p in rules["policies"]],
    }


def test_renderer_defaults_are_the_behavior_the_bench_chose():
    results = ROOT / "bench" / "results" / "autoscaling.json"
    if not results.exists():
        pytest.fail("bench/results/autoscaling.json is missing: run python bench/autoscaling/run.py")
    data = json.loads(results.read_text())
    chosen = data["behaviors"][data["chosen"]["behavior"]]
    assert _wire(chosen["up"]) == DEFAULT_SCALE_UP
    assert _wire(chosen["down"]) == DEFAULT_SCALE_DOWN
