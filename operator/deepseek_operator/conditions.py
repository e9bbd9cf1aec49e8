"""Status vocabulary of a DeepSeekModel: condition types, reasons and the phase, in one place.

Three conditions (metav1.Condition shape):

* ``EngineBuilt``: the engine for the *current* spec is in the cache.
* ``Serving``: a Triton Deployment is available (it may still serve an older engine).
* ``Ready``: the current spec is in effect: its engine is built and served by an available Deployment.

``phase`` is a one-word summary derived from the three (see :func:`derive_phase`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# ---------------------------------------------------------------- condition types
ENGINE_BUILT = "EngineBuilt"
SERVING = "Serving"
READY = "Ready"
CONDITION_TYPES = (ENGINE_BUILT, SERVING, READY)


class Reason:
    """CamelCase reasons of the three conditions (a failed build Job's own reason is used as is)."""

    #: The spec fails validation; the message names the field to fix.
    INVALID_SPEC = "InvalidSpec"
    #: spec.cache.size is unset and the cache claim does not exist.
    CACHE_CLAIM_MISSING = "CacheClaimMissing"
    #: A build Job for the engine was created and has not finished.
    BUILD_RUNNING = "BuildRunning"
    #: Another model's build Job builds the same engine (same key, same cache): this model waits for it.
    WAITING_FOR_BUILD = "WaitingForBuild"
    #: The build Job finished and the engine is in the cache.
    BUILD_SUCCEEDED = "BuildSucceeded"
    #: The engine was already in the cache (same engine inputs): no build ran.
    ENGINE_REUSED = "EngineReused"
    #: The build Job failed without a reason of its own (BackoffLimitExceeded, DeadlineExceeded, ... are used as is).
    BUILD_FAILED = "BuildFailed"
    #: No engine is built yet, so there is nothing to serve.
    WAITING_FOR_ENGINE = "WaitingForEngine"
    #: The Deployment has at least one available replica.
    DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
    #: The Deployment exists but has no available replica yet.
    DEPLOYMENT_UNAVAILABLE = "DeploymentUnavailable"
    #: The Deployment is asked for zero replicas.
    SCALED_TO_ZERO = "ScaledToZero"
    #: The Deployment is rolling out the current engine or serving settings.
    ROLLING_OUT = "RollingOut"
    #: A new engine is being built; the previous one keeps serving.
    ENGINE_REBUILDING = "EngineRebuilding"
    #: The autoscaler's API (KEDA's ScaledObject, or autoscaling/v2) is not served by this cluster.
    AUTOSCALER_UNAVAILABLE = "AutoscalerUnavailable"
    #: Everything in the spec is in effect and Triton is available.
    MODEL_READY = "ModelReady"


class Phase:
    """Values of status.phase."""

    PENDING = "Pending"
    BUILDING = "Building"
    DEPLOYING = "Deploying"
    READY = "Ready"
    FAILED = "Failed"


PHASES = (Phase.PENDING, Phase.BUILDING, Phase.DEPLOYING, Phase.READY, Phase.FAILED)


@dataclass(frozen=True)
class ConditionValue:
    """One condition without its bookkeeping (transition time, generation)."""

    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str


def merge_conditions(
    previous: list[dict] | None,
    current: dict[str, ConditionValue],
    generation: Optional[int],
    now: str,
) -> list[dict]:
    """Conditions in CONDITION_TYPES order; ``lastTransitionTime`` moves only when ``status`` changes."""
    before = {c.get("type"): c for c in previous or [] if isinstance(c, dict)}
    out = []
    for ctype in CONDITION_TYPES:
        value = current[ctype]
        old = before.get(ctype)
        changed = old is None or old.get("status") != value.status
        out.append(
            {
                "type": ctype,
                "status": value.status,
                "reason": value.reason,
                "message": value.message,
                "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    return out


def derive_phase(current: dict[str, ConditionValue]) -> str:
    """Failed (invalid spec or failed build) > Ready > Building > Deploying > Pending.

    A missing cache claim leaves the model Pending: creating the claim resolves it without a spec change.
    Waiting for another model's build of the same engine is Building.
    """
    built, ready = current[ENGINE_BUILT], current[READY]
    if built.status == "False" and built.reason not in (Reason.CACHE_CLAIM_MISSING, Reason.WAITING_FOR_BUILD):
        return Phase.FAILED
    if ready.status == "True":
        return Phase.READY
    if built.reason in (Reason.BUILD_RUNNING, Reason.WAITING_FOR_BUILD):
        return Phase.BUILDING
    if built.status == "True":
        return Phase.DEPLOYING
    return Phase.PENDING
