"""The autoscaler renderer: HPA (prometheus-adapter) and KEDA ScaledObject, defaults, overrides, status."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from deepseek_operator import naming
from deepseek_operator.api import SpecError, parse_resource
from deepseek_operator.autoscaling import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    GPU_UTIL_METRIC,
    QUEUE_RATIO_METRIC,
    SCHEDULER_QUEUE_METRIC,
    autoscaler_hpa_name,
    autoscaler_status,
    quantity,
    render_autoscaler,
)

K8S_VERSION = "1.33"
OWNER = {
    "apiVersion": "deepseek.ai/v1alpha1",
    "kind": "DeepSeekModel",
    "name": "chat",
    "uid": "0b1c2d3e-0000-4000-8000-000000000001",
    "controller": True,
    "blockOwnerDeletion": True,
}


def model(autoscaling: dict | None = None, name: str = "chat", namespace: str = "serving",
          task: str = "text-generation"):
    return parse_resource(
        {
            "apiVersion": "deepseek.ai/v1alpha1",
            "kind": "DeepSeekModel",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "model": {"source": "hf://deepseek-ai/deepseek-coder-1.3b-instruct", "task": task},
                "autoscaling": autoscaling if autoscaling is not None else {"enabled": True},
            },
        }
    )


def validate(obj: dict) -> None:
    kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)


def test_no_autoscaler_when_autoscaling_disabled():
    assert render_autoscaler(model({"enabled": False}), OWNER) == []
    assert render_autoscaler(model({}), OWNER) == []


def test_hpa_uses_gpu_utilization_when_autoscaling_enabled():
    [hpa] = render_autoscaler(model({"enabled": True, "minReplicas": 2, "maxReplicas": 9,
                                     "targetGPUUtilization": 65}), OWNER)
    validate(hpa)
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    assert hpa["metadata"]["name"] == naming.triton_name("chat")
    assert hpa["metadata"]["namespace"] == "serving"
    assert hpa["metadata"]["labels"] == naming.standard_labels("chat", "triton")
    assert hpa["metadata"]["ownerReferences"] == [OWNER]
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-triton"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 9)
    assert spec["metrics"] == [
        {
            "type": "Pods",
            "pods": {"metric": {"name": GPU_UTIL_METRIC}, "target": {"type": "AverageValue", "averageValue": "65"}},
        }
    ]


@pytest.mark.parametrize(("task", "queue"), [("text-generation", SCHEDULER_QUEUE_METRIC),
                                             ("text-classification", QUEUE_RATIO_METRIC),
                                             ("feature-extraction", QUEUE_RATIO_METRIC)])
def test_hpa_adds_the_queue_signal_of_the_task_when_target_set(task, queue):
    """Text generation queues in its scheduler (requests waiting per slot); the other tasks in Triton."""
    [hpa] = render_autoscaler(model({"enabled": True, "targetQueueRatio": 0.5}, task=task), OWNER)
    validate(hpa)
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == [GPU_UTIL_METRIC, queue]
    assert hpa["spec"]["metrics"][1]["pods"]["target"] == {"type": "AverageValue", "averageValue": "500m"}


@pytest.mark.parametrize("value,expected", [(70, "70"), (0.5, "500m"), (1.25, "1250m"), (2.0, "2"), (0.001, "1m")])
def test_quantity_formats_targets_as_kubernetes_quantities(value, expected):
    assert quantity(value) == expected


def test_default_behavior_reacts_fast_up_and_slowly_down():
    [hpa] = render_autoscaler(model(), OWNER)
    behavior = hpa["spec"]["behavior"]
    assert behavior == {"scaleUp": DEFAULT_SCALE_UP, "scaleDown": DEFAULT_SCALE_DOWN}
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert behavior["scaleUp"]["policies"] and behavior["scaleDown"]["policies"]


def test_behavior_fields_set_in_spec_override_defaults_one_by_one():
    [hpa] = render_autoscaler(
        model(
            {
                "enabled": True,
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 30},
                    "scaleDown": {
                        "selectPolicy": "Min",
                        "policies": [{"type": "Percent", "value": 10, "periodSeconds": 120}],
                    },
                },
            }
        ),
        OWNER,
    )
    validate(hpa)
    up, down = hpa["spec"]["behavior"]["scaleUp"], hpa["spec"]["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 30
    assert up["policies"] == DEFAULT_SCALE_UP["policies"] and up["selectPolicy"] == DEFAULT_SCALE_UP["selectPolicy"]
    assert down["selectPolicy"] == "Min"
    assert down["policies"] == [{"type": "Percent", "value": 10, "periodSeconds": 120}]
    assert down["stabilizationWindowSeconds"] == DEFAULT_SCALE_DOWN["stabilizationWindowSeconds"]


def test_disabled_scale_down_keeps_policies_so_the_hpa_stays_valid():
    [hpa] = render_autoscaler(model({"enabled": True, "behavior": {"scaleDown": {"selectPolicy": "Disabled"}}}), OWNER)
    validate(hpa)
    assert hpa["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"]


def test_renderer_does_not_mutate_defaults():
    before = copy.deepcopy((DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN))
    [hpa] = render_autoscaler(model(), OWNER)
    hpa["spec"]["behavior"]["scaleUp"]["policies"].append({"type": "Pods", "value": 1, "periodSeconds": 1})
    hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] = 1
    assert (DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN) == before


def test_long_model_names_give_valid_names_and_matching_target():
    name = "m" * 63
    [hpa] = render_autoscaler(model(name=name), {**OWNER, "name": name})
    validate(hpa)
    assert len(hpa["metadata"]["name"]) <= 63
    assert hpa["spec"]["scaleTargetRef"]["name"] == hpa["metadata"]["name"] == naming.triton_name(name)


def test_renderer_is_deterministic():
    m = model({"enabled": True, "targetQueueRatio": 0.8, "metricsBackend": "keda",
               "prometheusAddress": "http://prometheus.monitoring:9090"})
    assert render_autoscaler(m, OWNER) == render_autoscaler(m, OWNER)


# ---------------------------------------------------------------- KEDA
KEDA = {
    "enabled": True,
    "minReplicas": 1,
    "maxReplicas": 6,
    "targetGPUUtilization": 75,
    "targetQueueRatio": 0.5,
    "metricsBackend": "keda",
    "prometheusAddress": "http://prometheus-operated.monitoring.svc:9090",
    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 120}},
}


def test_keda_backend_renders_scaled_object_with_prometheus_triggers():
    [so] = render_autoscaler(model(KEDA), OWNER)
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert so["metadata"]["name"] == "chat-triton" and so["metadata"]["ownerReferences"] == [OWNER]
    assert so["metadata"]["labels"] == naming.standard_labels("chat", "triton")
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-triton"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    # Field sets of KEDA's CRD (config/crd/bases/keda.sh_scaledobjects.yaml, keda.sh/v1alpha1): the API
    # server would prune anything else. spec requires scaleTargetRef and triggers; a trigger, type and metadata.
    assert set(spec) <= {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                         "minReplicaCount", "maxReplicaCount", "advanced", "triggers", "fallback", "idleReplicaCount"}
    assert set(spec["advanced"]) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount",
                                     "scalingModifiers"}
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= {"behavior", "name"}
    assert all(isinstance(spec[k], int) for k in ("pollingInterval", "minReplicaCount", "maxReplicaCount"))
    gpu, queue = spec["triggers"]
    for trigger in (gpu, queue):
        assert trigger["type"] == "prometheus"
        assert set(trigger) <= {"type", "name", "metricType", "metadata", "authenticationRef", "useCachedMetrics"}
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata is map[string]string"
        assert trigger["metadata"]["serverAddress"] == KEDA["prometheusAddress"]
    assert gpu["metricType"] == "AverageValue" and gpu["metadata"]["threshold"] == "75"
    assert GPU_UTIL_METRIC in gpu["metadata"]["query"]
    assert 'namespace="serving"' in gpu["metadata"]["query"]
    assert 'pod=~"chat-triton-[a-z0-9]+-[a-z0-9]+"' in gpu["metadata"]["query"]
    assert queue["metricType"] == "Value" and queue["metadata"]["threshold"] == "0.5"
    assert queue["name"] == "scheduler-queue-ratio"
    assert "deepseek_scheduler_requests_waiting" in queue["metadata"]["query"]
    assert "deepseek_scheduler_slots" in queue["metadata"]["query"]
    assert 'pod=~"chat-triton-[a-z0-9]+-[a-z0-9]+"' in queue["metadata"]["query"]


def test_keda_queue_trigger_of_a_classifier_reads_tritons_queue():
    [so] = render_autoscaler(model(KEDA, task="text-classification"), OWNER)
    _, queue = so["spec"]["triggers"]
    assert queue["name"] == "queue-compute-ratio"
    assert "nv_inference_queue_duration_us" in queue["metadata"]["query"]
    assert "nv_inference_compute_infer_duration_us" in queue["metadata"]["query"]


def test_keda_scaled_object_carries_the_same_behavior_as_the_hpa():
    [so] = render_autoscaler(model(KEDA), OWNER)
    [hpa] = render_autoscaler(model({**KEDA, "metricsBackend": "prometheus-adapter"}), OWNER)
    hpa_config = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa_config["behavior"] == hpa["spec"]["behavior"]
    assert hpa_config["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    # The behavior KEDA copies into its HPA must itself be a valid HPA behavior.
    validate({**hpa, "spec": {**hpa["spec"], "behavior": hpa_config["behavior"]}})


def test_keda_without_prometheus_address_names_the_missing_field():
    with pytest.raises(SpecError, match=r"spec\.autoscaling\.prometheusAddress"):
        render_autoscaler(model({"enabled": True, "metricsBackend": "keda"}), OWNER)


def test_keda_gpu_trigger_only_when_no_queue_target():
    [so] = render_autoscaler(model({**KEDA, "targetQueueRatio": None}), OWNER)
    assert [t["name"] for t in so["spec"]["triggers"]] == ["gpu-utilization"]


# ---------------------------------------------------------------- status
def test_autoscaler_status_reads_hpa_replicas():
    hpa = {"status": {"currentReplicas": 3, "desiredReplicas": 5, "currentMetrics": []}}
    assert autoscaler_status(hpa) == {"currentReplicas": 3, "desiredReplicas": 5}


def test_autoscaler_status_is_none_until_the_hpa_reports():
    assert autoscaler_status({}) == {"currentReplicas": None, "desiredReplicas": None}
    assert autoscaler_status({"status": None}) == {"currentReplicas": None, "desiredReplicas": None}
    assert autoscaler_status({"status": {"desiredReplicas": 2}}) == {"currentReplicas": None, "desiredReplicas": 2}


def test_autoscaler_hpa_name_points_at_keda_hpa_for_keda():
    assert autoscaler_hpa_name(model()) == "chat-triton"
    m = model(KEDA)
    [so] = render_autoscaler(m, OWNER)
    assert autoscaler_hpa_name(m) == so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"]
    assert autoscaler_hpa_name(m) == "keda-hpa-chat-triton"
