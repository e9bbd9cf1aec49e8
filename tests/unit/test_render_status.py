"""Status vocabulary: conditions keep their transition time until their status changes; phase derivation."""

from __future__ import annotations

import pytest

from deepseek_operator import api
from deepseek_operator.conditions import (
    CONDITION_TYPES, ENGINE_BUILT, READY, SERVING, ConditionValue, Phase, Reason, derive_phase, merge_conditions,
)

T, F, U = "True", "False", "Unknown"


def state(built=(U, Reason.BUILD_RUNNING), serving=(F, Reason.WAITING_FOR_ENGINE), ready=(F, Reason.WAITING_FOR_ENGINE)):
    return {
        ENGINE_BUILT: ConditionValue(*built, "m"),
        SERVING: ConditionValue(*serving, "m"),
        READY: ConditionValue(*ready, "m"),
    }


@pytest.mark.parametrize(
    "current, phase",
    [
        (state(), Phase.BUILDING),
        (state(built=(F, Reason.INVALID_SPEC), ready=(F, Reason.INVALID_SPEC)), Phase.FAILED),
        (state(built=(F, "BackoffLimitExceeded"), ready=(F, Reason.BUILD_FAILED)), Phase.FAILED),
        (state(built=(F, Reason.CACHE_CLAIM_MISSING), ready=(F, Reason.CACHE_CLAIM_MISSING)), Phase.PENDING),
        (state(built=(T, Reason.BUILD_SUCCEEDED), ready=(F, Reason.DEPLOYMENT_UNAVAILABLE)), Phase.DEPLOYING),
        (state(built=(T, Reason.ENGINE_REUSED), serving=(T, Reason.DEPLOYMENT_AVAILABLE),
               ready=(F, Reason.ROLLING_OUT)), Phase.DEPLOYING),
        (state(built=(T, Reason.BUILD_SUCCEEDED), serving=(T, Reason.DEPLOYMENT_AVAILABLE),
               ready=(T, Reason.MODEL_READY)), Phase.READY),
        (state(serving=(T, Reason.DEPLOYMENT_AVAILABLE), ready=(F, Reason.ENGINE_REBUILDING)), Phase.BUILDING),
    ],
)
def test_phase_is_derived_from_the_conditions(current, phase):
    assert derive_phase(current) == phase


def test_transition_time_moves_only_when_status_changes():
    first = merge_conditions(None, state(), 1, "t1")
    assert [c["type"] for c in first] == list(CONDITION_TYPES)
    assert all(c["lastTransitionTime"] == "t1" and c["observedGeneration"] == 1 for c in first)
    # Same statuses, new reason for Ready: its time stays; EngineBuilt flips and gets the new time.
    second = merge_conditions(first, state(built=(T, Reason.BUILD_SUCCEEDED), ready=(F, Reason.ROLLING_OUT)), 2, "t2")
    by_type = {c["type"]: c for c in second}
    assert by_type[ENGINE_BUILT]["lastTransitionTime"] == "t2"
    assert by_type[READY]["lastTransitionTime"] == "t1" and by_type[READY]["reason"] == Reason.ROLLING_OUT
    assert by_type[SERVING]["observedGeneration"] == 2


def test_conditions_fit_the_api_condition_model():
    for cond in merge_conditions(None, state(), 3, "2026-01-01T00:00:00Z"):
        api.Condition.model_validate(cond)


def test_reasons_are_camel_case_and_unique():
    reasons = [v for k, v in vars(Reason).items() if not k.startswith("_")]
    assert len(reasons) == len(set(reasons))
    assert all(r[0].isupper() and r.isalnum() for r in reasons)
