"""The autoscaler of a DeepSeekModel's Triton Deployment: an HPA (autoscaling/v2) or a KEDA ScaledObject.

Both paths scale on the same two signals and with the same ``behavior``:

* ``DCGM_FI_DEV_GPU_UTIL``: DCGM's GPU duty cycle (percent) averaged over each
  replica's GPUs, target ``spec.autoscaling.targetGPUUtilization`` per replica;
* the queue ratio (optional, when ``targetQueueRatio`` is set), which shows
  saturation before the duty cycle does (a GPU at 100% duty cycle can still keep up):

  - text generation: ``deepseek_scheduler_queue_ratio``, the requests waiting
    for a KV-cache slot over the slots (``deepseek_scheduler_requests_waiting /
    deepseek_scheduler_slots``, averaged over the rate window).  The scheduler
    batches in flight and keeps its own queue, which Triton's queue metrics do
    not see;
  - classification and embeddings (Triton's dynamic batching):
    ``triton_queue_compute_ratio``, Triton's queue time over compute time,
    ``rate(nv_inference_queue_duration_us) / rate(nv_inference_compute_infer_duration_us)``.

``metricsBackend: prometheus-adapter`` renders an HPA on *Pods* metrics; the
names above are what the chart's prometheus-adapter rules expose
(``charts/deepseek-operator/templates/monitoring/prometheus-adapter-rules.yaml``).
``metricsBackend: keda`` renders a ScaledObject whose prometheus triggers run the
equivalent PromQL against ``spec.autoscaling.prometheusAddress``; KEDA then owns
an HPA named :func:`autoscaler_hpa_name`.

The behavior defaults come from ``bench/autoscaling/run.py`` (see
docs/autoscaling.md for the numbers behind them).  Everything here is pure: no
client, no clock.
"""

from __future__ import annotations

from typing import Any, Optional

from . import naming
from .api import AutoscalingSpec, DeepSeekModel, ScalingRules, SpecError

#: Pods metric (prometheus-adapter) and DCGM series: GPU duty cycle, percent.
GPU_UTIL_METRIC = "DCGM_FI_DEV_GPU_UTIL"
#: Pods metric exposed by the adapter rules: Triton queue time / compute time.
QUEUE_RATIO_METRIC = "triton_queue_compute_ratio"
#: Recording rule (PrometheusRule) of the same ratio, per namespace/pod/model, for dashboards and alerts.
QUEUE_RATIO_RECORD = "deepseek:triton_queue_compute_ratio"
#: Triton counters the ratio is made of (cumulative microseconds).
TRITON_QUEUE_US = "nv_inference_queue_duration_us"
TRITON_COMPUTE_US = "nv_inference_compute_infer_duration_us"
#: Pods metric exposed by the adapter rules for text generation: requests waiting per KV-cache slot.
SCHEDULER_QUEUE_METRIC = "deepseek_scheduler_queue_ratio"
#: Its recording rule, per namespace/pod/model.
SCHEDULER_QUEUE_RECORD = "deepseek:scheduler_queue_ratio"
#: The scheduler's gauges it is made of (models/generate/model.py publishes them).
SCHEDULER_WAITING = "deepseek_scheduler_requests_waiting"
SCHEDULER_SLOTS = "deepseek_scheduler_slots"
#: Rate window of the ratio: four scrapes at a 15 s interval.
RATE_WINDOW = "1m"
#: How often KEDA's operator checks its triggers (only for activation to/from zero; the HPA sync drives 1..N).
KEDA_POLLING_INTERVAL_SECONDS = 15

#: Scale-up defaults: react within one HPA sync, no stabilization, at most double (or +4 pods) per 15 s.
DEFAULT_SCALE_UP: dict[str, Any] = {
    "stabilizationWindowSeconds": 0,
    "selectPolicy": "Max",
    "policies": [
        {"type": "Percent", "value": 100, "periodSeconds": 15},
        {"type": "Pods", "value": 4, "periodSeconds": 15},
    ],
}
#: Scale-down defaults: act on the highest recommendation of the last 5 minutes, then shed one pod a minute.
#: Of the behaviors the bench tried, the cheapest with no flaps and a p99 within 10% of the best
#: (Kubernetes' default, 100% per 15 s, undid a scale-down on the step trace; docs/autoscaling.md).
DEFAULT_SCALE_DOWN: dict[str, Any] = {
    "stabilizationWindowSeconds": 300,
    "selectPolicy": "Max",
    "policies": [
        {"type": "Pods", "value": 1, "periodSeconds": 60},
    ],
}


# ---------------------------------------------------------------- behavior
def _merge_rules(defaults: dict[str, Any], rules: Optional[ScalingRules]) -> dict[str, Any]:
    """Fields set in the spec win; unset ones keep the default (an HPA rule needs at least one policy)."""
    merged = {**defaults, "policies": [dict(p) for p in defaults["policies"]]}
    if rules is None:
        return merged
    if rules.stabilization_window_seconds is not None:
        merged["stabilizationWindowSeconds"] = rules.stabilization_window_seconds
    if rules.select_policy is not None:
        merged["selectPolicy"] = rules.select_policy
    if rules.policies:
        merged["policies"] = [p.wire() for p in rules.policies]
    return merged


def effective_behavior(autoscaling: AutoscalingSpec) -> dict[str, Any]:
    """The HPA ``behavior``: the spec's overrides on top of the defaults."""
    behavior = autoscaling.behavior
    return {
        "scaleUp": _merge_rules(DEFAULT_SCALE_UP, behavior.scale_up if behavior else None),
        "scaleDown": _merge_rules(DEFAULT_SCALE_DOWN, behavior.scale_down if behavior else None),
    }


# ---------------------------------------------------------------- PromQL for KEDA
def pod_regex(model_name: str) -> str:
    """PromQL regex of the Deployment's pod names (``<deployment>-<template hash>-<suffix>``)."""
    return f"{naming.triton_name(model_name)}-[a-z0-9]+-[a-z0-9]+"


def _selector(model: DeepSeekModel) -> str:
    return f'namespace="{model.namespace}",pod=~"{pod_regex(model.name)}"'


def gpu_utilization_query(model: DeepSeekModel) -> str:
    """Sum over replicas of each replica's mean GPU duty cycle; KEDA's AverageValue divides it by the replicas."""
    return f"sum(avg by (pod) ({GPU_UTIL_METRIC}{{{_selector(model)}}}))"


def uses_scheduler(model: DeepSeekModel) -> bool:
    """Text generation is batched in flight by the model's scheduler; the other tasks by Triton."""
    return model.spec.model.task == "text-generation"


def queue_metric(model: DeepSeekModel) -> str:
    """The Pods metric of the queue signal for this model's task."""
    return SCHEDULER_QUEUE_METRIC if uses_scheduler(model) else QUEUE_RATIO_METRIC


def queue_ratio_query(model: DeepSeekModel, window: str = RATE_WINDOW) -> str:
    """The Deployment's queue signal (0 when idle, never NaN): requests waiting per slot for text generation,
    Triton's queue time over compute time otherwise."""
    sel = _selector(model)
    if uses_scheduler(model):
        return (
            f"(sum(avg_over_time({SCHEDULER_WAITING}{{{sel}}}[{window}])) / "
            f"clamp_min(sum(avg_over_time({SCHEDULER_SLOTS}{{{sel}}}[{window}])), 1)) or vector(0)"
        )
    return (
        f"(sum(rate({TRITON_QUEUE_US}{{{sel}}}[{window}])) / "
        f"clamp_min(sum(rate({TRITON_COMPUTE_US}{{{sel}}}[{window}])), 1)) or vector(0)"
    )


def quantity(value: float) -> str:
    """A Kubernetes quantity string: integers as is, fractions in milli-units (0.5 -> 500m)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def _number(value: float) -> str:
    """A KEDA threshold (a plain decimal string)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---------------------------------------------------------------- renderers
def _metadata(model: DeepSeekModel, owner: dict) -> dict[str, Any]:
    return {
        "name": naming.triton_name(model.name),
        "namespace": model.namespace,
        "labels": naming.standard_labels(model.name, "triton"),
        "ownerReferences": [owner],
    }


def _scale_target(model: DeepSeekModel) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": naming.triton_name(model.name)}


def render_hpa(model: DeepSeekModel, owner: dict) -> dict[str, Any]:
    """An autoscaling/v2 HPA on the Pods metrics served by the chart's prometheus-adapter rules."""
    spec = model.spec.autoscaling
    metrics = [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": GPU_UTIL_METRIC},
                "target": {"type": "AverageValue", "averageValue": quantity(spec.target_gpu_utilization)},
            },
        }
    ]
    if spec.target_queue_ratio is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": queue_metric(model)},
                    "target": {"type": "AverageValue", "averageValue": quantity(spec.target_queue_ratio)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(model, owner),
        "spec": {
            "scaleTargetRef": _scale_target(model),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": metrics,
            "behavior": effective_behavior(spec),
        },
    }


def render_scaled_object(model: DeepSeekModel, owner: dict) -> dict[str, Any]:
    """A KEDA ScaledObject with prometheus triggers equivalent to the HPA's Pods metrics."""
    spec = model.spec.autoscaling
    if not spec.prometheus_address:
        raise SpecError(
            [
                "spec.autoscaling.prometheusAddress: required when metricsBackend is keda "
                "(e.g. http://prometheus-operated.monitoring.svc:9090)"
            ]
        )
    triggers = [
        {
            "type": "prometheus",
            "name": "gpu-utilization",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": spec.prometheus_address,
                "query": gpu_utilization_query(model),
                "threshold": _number(spec.target_gpu_utilization),
            },
        }
    ]
    if spec.target_queue_ratio is not None:
        triggers.append(
            {
                "type": "prometheus",
                "name": "scheduler-queue-ratio" if uses_scheduler(model) else "queue-compute-ratio",
                "metricType": "Value",
                "metadata": {
                    "serverAddress": spec.prometheus_address,
                    "query": queue_ratio_query(model),
                    "threshold": _number(spec.target_queue_ratio),
                },
            }
        )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(model, owner),
        "spec": {
            "scaleTargetRef": _scale_target(model),
            "pollingInterval": KEDA_POLLING_INTERVAL_SECONDS,
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "name": autoscaler_hpa_name(model),
                    "behavior": effective_behavior(spec),
                },
            },
            "triggers": triggers,
        },
    }


def render_autoscaler(model: DeepSeekModel, owner: dict) -> list[dict[str, Any]]:
    """[HPA], [ScaledObject] or [] (autoscaling disabled), per ``spec.autoscaling``."""
    spec = model.spec.autoscaling
    if not spec.enabled:
        return []
    if spec.metrics_backend == "keda":
        return [render_scaled_object(model, owner)]
    return [render_hpa(model, owner)]


# ---------------------------------------------------------------- status
def autoscaler_hpa_name(model: DeepSeekModel) -> str:
    """The HPA whose status holds the replica counts: ours, or the one KEDA creates for the ScaledObject."""
    name = naming.triton_name(model.name)
    if model.spec.autoscaling.metrics_backend == "keda":
        return f"keda-hpa-{name}"
    return name


def autoscaler_status(obj: dict) -> dict[str, Optional[int]]:
    """``{"currentReplicas", "desiredReplicas"}`` from an HPA's status (None until the HPA has reported).

    A ScaledObject's own status has no replica counts: pass the HPA it names
    (``status.hpaName``, or :func:`autoscaler_hpa_name`) instead.
    """
    status = (obj or {}).get("status") or {}

    def _int(key: str) -> Optional[int]:
        value = status.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return {"currentReplicas": _int("currentReplicas"), "desiredReplicas": _int("desiredReplicas")}
