"""Where the engine of one model stands, and what to do about it: pure functions of what was observed.

One build per engine key and cache.  The claim on a build lives in the cluster,
in a Lease per (cache claim, engine key) (:func:`claim_name`): its holder is the
model whose Job builds the engine, and the Job's name rides on it.  Creating the
Lease is the claim (the API server lets exactly one create win); taking over a
build whose holder is gone is a JSON patch that tests the old holder (exactly one
patch wins).  The engine index ConfigMap records engines once built.

:func:`derive_engine` reads the index entry, the Lease, the Job it names and
whether the holder still wants that engine, and returns an :class:`EngineView`:
the state (an :class:`EngineState`) and the :class:`EngineAction` to take.  It
reads no clock and calls no API; ``reconcile.py`` observes and acts.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from dataclasses import dataclass
from typing import Any, Optional

from . import naming

#: Lease annotations: the build Job the holder runs, and the engine key it builds.
LEASE_JOB_ANNOTATION = "deepseek.ai/build-job"
LEASE_KEY_ANNOTATION = "deepseek.ai/engine-key"


class EngineState(str, enum.Enum):
    """The engine of a model's current spec."""

    #: No engine, no build: this model may claim the build.
    ABSENT = "absent"
    #: This model's own Job is building it.
    BUILDING = "building"
    #: Another model's Job is building the same engine: this model waits for it.
    WAITING = "waiting"
    #: The engine is in the cache.
    BUILT = "built"
    #: The Job that builds it failed (this model's, or the one it waited for); never retried by itself.
    FAILED = "failed"


class EngineAction(str, enum.Enum):
    """What the reconcile does about the engine."""

    NONE = "none"
    #: Create the Lease with this model as holder, then its build Job.
    CLAIM = "claim"
    #: The Lease is this model's but its Job is gone (deleted to retry, or never created): create the Job.
    CREATE_JOB = "create-job"
    #: The holder is gone (deleted, or its spec moved to another engine) and so is its Job: take the Lease over.
    TAKE_OVER = "take-over"
    #: The Job succeeded and the index does not say so yet: record the engine.
    RECORD = "record"


@dataclass(frozen=True)
class EngineView:
    """The engine state of one model plus the facts its conditions report."""

    key: str
    state: EngineState
    action: EngineAction = EngineAction.NONE
    job: Optional[str] = None
    holder: Optional[str] = None
    reused: bool = False
    built_at: Optional[str] = None
    build_seconds: Optional[float] = None
    reason: str = ""
    message: str = ""


def claim_name(cache_claim: str, key: str) -> str:
    """The Lease that claims the build of ``key`` in ``cache_claim`` (a DNS name of at most 63 characters)."""
    digest = hashlib.sha256(f"{cache_claim}/{key}".encode()).hexdigest()[:12]
    return f"deepseek-build-{key[:16]}-{digest}"


def job_condition(job: Optional[dict], ctype: str) -> Optional[dict]:
    """The Job's condition ``ctype`` when it is True."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def job_succeeded(job: Optional[dict]) -> bool:
    return job is not None and (job_condition(job, "Complete") is not None
                                or int((job.get("status") or {}).get("succeeded") or 0) >= 1)


def _parse_time(value: Optional[str]) -> Optional[datetime.datetime]:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def build_seconds(job: dict) -> Optional[float]:
    """How long a finished Job ran, from its own timestamps."""
    status = job.get("status") or {}
    start, end = _parse_time(status.get("startTime")), _parse_time(status.get("completionTime"))
    return round((end - start).total_seconds(), 1) if start and end else None


def lease_holder(lease: Optional[dict]) -> Optional[str]:
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def lease_job(lease: Optional[dict]) -> Optional[str]:
    return (((lease or {}).get("metadata") or {}).get("annotations") or {}).get(LEASE_JOB_ANNOTATION)


def failed_view(key: str, job: dict, namespace: str, holder: Optional[str], mine: bool) -> EngineView:
    """A failed Job's reason as is (BackoffLimitExceeded, DeadlineExceeded, ...) and what to do next."""
    name = job["metadata"]["name"]
    failed = job_condition(job, "Failed") or {}
    reason = failed.get("reason") or "BuildFailed"
    detail = failed.get("message") or "the builder exited with an error"
    whose = "" if mine else f" (started by {holder}, which this model waited for)"
    message = (
        f"Build Job {name}{whose} failed ({reason}: {detail}). See `kubectl logs -n {namespace} job/{name}`. "
        "It is not retried: fix the cause and change spec.model or spec.engine (a new engine key builds "
        "again), or delete the Job to retry the same engine."
    )
    return EngineView(key, EngineState.FAILED, job=name, holder=holder, reason=reason, message=message)


def derive_engine(
    *,
    key: str,
    model: str,
    namespace: str,
    own_job_name: str,
    entry: Optional[dict[str, Any]],
    lease: Optional[dict],
    job: Optional[dict],
    holder_wants_key: Optional[bool],
) -> EngineView:
    """The engine state of ``model`` for ``key``, and the action to take.

    ``entry`` is the engine index entry (None: not recorded), ``lease`` the build claim (None: unclaimed),
    ``job`` the Job the Lease names (or, with no Lease, this model's own Job), and ``holder_wants_key``
    whether the Lease's holder exists and its spec still names ``key`` (None when this model is the holder).
    """
    if entry is not None:
        built_by = entry.get("job")
        return EngineView(key, EngineState.BUILT, job=built_by, holder=entry.get("model"),
                          reused=built_by != own_job_name, built_at=entry.get("builtAt"),
                          build_seconds=entry.get("buildSeconds"))
    holder = lease_holder(lease)
    if lease is None:
        if job is None:
            return EngineView(key, EngineState.ABSENT, EngineAction.CLAIM, job=own_job_name, holder=model)
        # A Job of this model from before the claim existed: claim it so that others wait for it.
        mine = job["metadata"]["name"]
        if job_succeeded(job):
            return _built_by(key, job, model, own_job_name)
        if job_condition(job, "Failed"):
            return failed_view(key, job, namespace, model, True)
        return EngineView(key, EngineState.BUILDING, EngineAction.CLAIM, job=mine, holder=model)
    mine = holder == model
    if job is None:
        if mine:
            return EngineView(key, EngineState.BUILDING, EngineAction.CREATE_JOB, job=lease_job(lease) or own_job_name,
                              holder=model)
        if not holder_wants_key:
            return EngineView(key, EngineState.BUILDING, EngineAction.TAKE_OVER, job=own_job_name, holder=model)
        return EngineView(key, EngineState.WAITING, job=lease_job(lease), holder=holder, reason="WaitingForBuild",
                          message=f"Waiting for {holder} to start its build Job {lease_job(lease)} of engine {key}.")
    if job_succeeded(job):
        return _built_by(key, job, holder, own_job_name)
    if job_condition(job, "Failed"):
        return failed_view(key, job, namespace, holder, mine)
    name = job["metadata"]["name"]
    if mine:
        return EngineView(key, EngineState.BUILDING, job=name, holder=model)
    return EngineView(key, EngineState.WAITING, job=name, holder=holder, reason="WaitingForBuild",
                      message=f"Waiting for build Job {name} of {holder}, which builds the same engine {key}.")


def _built_by(key: str, job: dict, holder: Optional[str], own_job_name: str) -> EngineView:
    name = job["metadata"]["name"]
    return EngineView(key, EngineState.BUILT, EngineAction.RECORD, job=name, holder=holder,
                      reused=name != own_job_name, built_at=(job.get("status") or {}).get("completionTime"),
                      build_seconds=build_seconds(job))


def index_entry(view: EngineView) -> dict[str, Any]:
    """The engine index entry of a built engine."""
    return {"builtAt": view.built_at, "buildSeconds": view.build_seconds, "job": view.job, "model": view.holder}


def render_claim(namespace: str, cache_claim: str, key: str, model: str, job: str) -> dict[str, Any]:
    """The Lease that claims the build (no owner: it must outlive its holder so a waiter can take it over)."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": claim_name(cache_claim, key),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "deepseek-engine-build",
                "app.kubernetes.io/component": "engine-cache",
                "app.kubernetes.io/part-of": naming.PART_OF,
                "app.kubernetes.io/managed-by": naming.MANAGED_BY,
                naming.SPEC_KEY_LABEL: key[:63],
            },
            "annotations": {LEASE_JOB_ANNOTATION: job, LEASE_KEY_ANNOTATION: key},
        },
        "spec": {"holderIdentity": model},
    }


def takeover_patch(old_holder: Optional[str], model: str, job: str) -> list[dict[str, Any]]:
    """A JSON patch that moves the Lease to ``model`` only if ``old_holder`` still holds it."""
    return [
        {"op": "test", "path": "/spec/holderIdentity", "value": old_holder},
        {"op": "replace", "path": "/spec/holderIdentity", "value": model},
        {"op": "replace", "path": f"/metadata/annotations/{LEASE_JOB_ANNOTATION.replace('/', '~1')}", "value": job},
    ]
