"""The engine state: a pure function of the index entry, the build claim (Lease), its Job and its holder."""

from __future__ import annotations

import pytest

from deepseek_operator.engine_state import (
    EngineAction as A, EngineState as S, claim_name, derive_engine, render_claim, takeover_patch,
)

KEY = "7ec24223d416ce4f5b84"
MINE = "me-build-7ec24223d4"


def lease(holder: str, job: str) -> dict:
    return render_claim("models", "deepseek-engine-cache", KEY, holder, job)


def job(name: str, state: str = "running") -> dict:
    conditions = {"running": [], "done": [{"type": "Complete", "status": "True"}],
                  "failed": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "late"}]}
    status = {"conditions": conditions[state]}
    if state == "done":
        status.update(startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T00:01:30Z", succeeded=1)
    return {"metadata": {"name": name, "namespace": "models"}, "status": status}


def derive(entry=None, claim=None, live_job=None, holder_wants=None):
    return derive_engine(key=KEY, model="me", namespace="models", own_job_name=MINE, entry=entry, lease=claim,
                         job=live_job, holder_wants_key=holder_wants)


@pytest.mark.parametrize("facts, state, action, job_name", [
    # Nothing yet: claim the build.
    ({}, S.ABSENT, A.CLAIM, MINE),
    # In the index: built, reused when another Job built it.
    ({"entry": {"job": "other-build-1", "model": "other"}}, S.BUILT, A.NONE, "other-build-1"),
    # Our claim, our Job running / gone (deleted to retry) / done / failed.
    ({"claim": lease("me", MINE), "live_job": job(MINE)}, S.BUILDING, A.NONE, MINE),
    ({"claim": lease("me", MINE)}, S.BUILDING, A.CREATE_JOB, MINE),
    ({"claim": lease("me", MINE), "live_job": job(MINE, "done")}, S.BUILT, A.RECORD, MINE),
    ({"claim": lease("me", MINE), "live_job": job(MINE, "failed")}, S.FAILED, A.NONE, MINE),
    # Another model's claim: wait while its Job runs or it is about to start one; share its outcome.
    ({"claim": lease("b", "b-build-1"), "live_job": job("b-build-1")}, S.WAITING, A.NONE, "b-build-1"),
    ({"claim": lease("b", "b-build-1"), "holder_wants": True}, S.WAITING, A.NONE, "b-build-1"),
    ({"claim": lease("b", "b-build-1"), "live_job": job("b-build-1", "done")}, S.BUILT, A.RECORD, "b-build-1"),
    ({"claim": lease("b", "b-build-1"), "live_job": job("b-build-1", "failed")}, S.FAILED, A.NONE, "b-build-1"),
    # Its holder is gone (or builds something else now) and so is its Job: take it over.
    ({"claim": lease("b", "b-build-1"), "holder_wants": False}, S.BUILDING, A.TAKE_OVER, MINE),
    # A Job of ours from before claims existed: claim it so others wait for it.
    ({"live_job": job(MINE)}, S.BUILDING, A.CLAIM, MINE),
])
def test_engine_state_and_action(facts, state, action, job_name):
    view = derive(**facts)
    assert (view.state, view.action, view.job) == (state, action, job_name)


def test_reused_is_true_only_for_an_engine_another_job_built():
    assert derive(entry={"job": MINE, "model": "me"}).reused is False
    assert derive(claim=lease("b", "b-build-1"), live_job=job("b-build-1", "done")).reused is True


def test_a_waiter_names_the_model_and_job_it_waits_for():
    view = derive(claim=lease("builder", "builder-build-1"), live_job=job("builder-build-1"))
    assert "builder" in view.message and "builder-build-1" in view.message and view.reason == "WaitingForBuild"


def test_a_failed_build_reports_the_jobs_reason_to_its_waiters_and_how_to_retry():
    view = derive(claim=lease("b", "b-build-1"), live_job=job("b-build-1", "failed"))
    assert view.reason == "DeadlineExceeded" and "b-build-1" in view.message and "delete the Job" in view.message


def test_claims_are_per_cache_and_key_and_valid_names():
    names = {claim_name(c, k) for c in ("a", "b") for k in (KEY, "0" * 20)}
    assert len(names) == 4 and all(len(n) <= 63 and n.replace("-", "").isalnum() for n in names)


def test_takeover_tests_the_old_holder_first():
    ops = takeover_patch("b", "me", MINE)
    assert ops[0] == {"op": "test", "path": "/spec/holderIdentity", "value": "b"}
    assert ops[2]["path"] == "/metadata/annotations/deepseek.ai~1build-job" and ops[2]["value"] == MINE
