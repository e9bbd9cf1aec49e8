"""Status as a pure function of the engine view and the live Deployment, validated by the pydantic status model."""

from __future__ import annotations

import pydantic
import pytest

from deepseek_operator import api, status
from deepseek_operator.engine_state import EngineState, EngineView

from test_render import CPU, make_model

KEY = "k" * 20
NOW = "2026-01-01T00:00:00Z"


def deployment(available: int = 1, key: str = KEY) -> dict:
    return {"metadata": {"name": "r1-triton", "generation": 2},
            "spec": {"replicas": 1, "template": {"metadata": {"annotations": {"deepseek.ai/engine-key": key}}}},
            "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "readyReplicas": available,
                       "availableReplicas": available}}


@pytest.mark.parametrize("view, dep, phase, built_reason, ready_reason", [
    (EngineView(KEY, EngineState.BUILDING, job="r1-build"), None, "Building", "BuildRunning", "WaitingForEngine"),
    (EngineView(KEY, EngineState.WAITING, job="b-build", holder="b", reason="WaitingForBuild",
                message="Waiting for build Job b-build of b"), None, "Building", "WaitingForBuild", "WaitingForEngine"),
    (EngineView(KEY, EngineState.FAILED, job="r1-build", reason="DeadlineExceeded", message="failed"), None,
     "Failed", "DeadlineExceeded", "BuildFailed"),
    (EngineView(KEY, EngineState.BUILT, job="b-build", reused=True), deployment(0), "Deploying", "EngineReused",
     "DeploymentUnavailable"),
    (EngineView(KEY, EngineState.BUILT, job="r1-build"), deployment(1), "Ready", "BuildSucceeded", "ModelReady"),
])
def test_status_is_derived_from_the_engine_and_the_deployment(view, dep, phase, built_reason, ready_reason):
    model = make_model("r1", CPU)
    out = status.derive(model, {}, view, None, KEY if dep else None, dep, None, None, NOW).status
    api.DeepSeekModelStatus.model_validate(out)
    conditions = {c["type"]: c for c in out["conditions"]}
    assert out["phase"] == phase
    assert (conditions["EngineBuilt"]["reason"], conditions["Ready"]["reason"]) == (built_reason, ready_reason)


def test_keys_the_status_no_longer_reports_are_removed_by_the_patch():
    model = make_model("r1", CPU)
    previous = {"autoscaling": {"currentReplicas": 2}, "phase": "Ready"}
    out = status.derive(model, previous, EngineView(KEY, EngineState.BUILDING, job="j"), None, None, None, None, None,
                        NOW).status
    assert out["autoscaling"] is None


def test_a_status_outside_the_schema_is_refused_before_it_is_written():
    current = {ctype: status.ConditionValue("False", "WaitingForEngine", "m")
               for ctype in ("EngineBuilt", "Serving", "Ready")}
    with pytest.raises(pydantic.ValidationError):
        status.finish({}, current, 1, {"replicas": "many"}, NOW)
