"""The table of children: which kinds a decision renders, and how the sync treats each."""

from __future__ import annotations

from deepseek_operator import children
from deepseek_operator.children import CHILDREN, Desired, render_all
from deepseek_operator.config import OperatorConfig

from test_render import AUTOSCALED, CPU, KEDA, make_model

CONFIG = OperatorConfig()
KEY = "k" * 20


def rendered(patch: dict, desired: Desired) -> dict[str, bool]:
    return {child.kind: obj is not None for child, obj in render_all(make_model("r1", patch), CONFIG, desired)}


def test_a_new_model_gets_its_claim_and_build_job_and_nothing_to_serve_yet():
    assert rendered(CPU, Desired(KEY, build=True)) == {
        "PersistentVolumeClaim": True, "Job": True, "Deployment": False, "Service": False,
        "PodDisruptionBudget": False, "HorizontalPodAutoscaler": False, "ScaledObject": False}


def test_a_waiting_model_starts_no_job():
    assert rendered(CPU, Desired(KEY))["Job"] is False


def test_a_built_engine_is_served_and_the_claim_left_alone():
    assert rendered({**CPU, **AUTOSCALED}, Desired(KEY, serve=KEY, built=True)) == {
        "PersistentVolumeClaim": False, "Job": False, "Deployment": True, "Service": True,
        "PodDisruptionBudget": True, "HorizontalPodAutoscaler": True, "ScaledObject": False}
    assert rendered({**CPU, **KEDA}, Desired(KEY, serve=KEY, built=True))["ScaledObject"] is True


def test_only_serving_kinds_are_pruned_and_applied_the_claim_and_jobs_outlive_decisions():
    by_kind = {c.kind: c for c in CHILDREN}
    assert {k for k, c in by_kind.items() if c.prune} == {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject"}
    assert {k for k, c in by_kind.items() if c.sync == "apply"} == {k for k, c in by_kind.items() if c.prune}
    assert (by_kind["Job"].sync, by_kind["PersistentVolumeClaim"].sync) == ("create", "ensure")
    assert set(children.AUTOSCALER_KINDS) <= set(by_kind)
