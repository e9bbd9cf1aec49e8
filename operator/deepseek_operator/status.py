"""A DeepSeekModel's status as pure functions of what the reconcile observed and did.

The conditions (``conditions.py``) come from the engine's :class:`EngineView`, the
live Triton Deployment and the autoscaler; the whole status is validated through
the pydantic :class:`~deepseek_operator.api.DeepSeekModelStatus`, the same model
the CRD's status schema is generated from.  No clock: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from . import naming, render
from .api import DeepSeekModel, DeepSeekModelStatus
from .conditions import ENGINE_BUILT, READY, SERVING, ConditionValue, Reason, derive_phase, merge_conditions
from .engine_state import EngineState, EngineView

#: Reasons of a False condition that deserve a Warning event.
WARNING_REASONS = {Reason.INVALID_SPEC, Reason.CACHE_CLAIM_MISSING, Reason.BUILD_FAILED, Reason.DEPLOYMENT_UNAVAILABLE,
                   Reason.AUTOSCALER_UNAVAILABLE}


@dataclass
class Outcome:
    """The status to write and the events to post."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def deployed_key(deployment: Optional[dict]) -> Optional[str]:
    """The engine key the live Deployment's pod template serves."""
    if deployment is None:
        return None
    template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return (template.get("annotations") or {}).get(naming.ENGINE_KEY_ANNOTATION)


def engine_built(engine: EngineView, live_key: Optional[str]) -> ConditionValue:
    if engine.state == EngineState.BUILT:
        if engine.reused:
            by = f" (built by Job {engine.job})" if engine.job else ""
            return ConditionValue("True", Reason.ENGINE_REUSED,
                                  f"Engine {engine.key} was already in the cache{by}; no build of its own was needed.")
        took = f" in {engine.build_seconds:g}s" if engine.build_seconds is not None else ""
        return ConditionValue("True", Reason.BUILD_SUCCEEDED, f"Job {engine.job} built engine {engine.key}{took}.")
    if engine.state == EngineState.FAILED:
        return ConditionValue("False", engine.reason, engine.message)
    serving = f" Engine {live_key} keeps serving until it finishes." if live_key and live_key != engine.key else ""
    if engine.state == EngineState.WAITING:
        return ConditionValue("False", Reason.WAITING_FOR_BUILD, engine.message + serving)
    return ConditionValue("Unknown", Reason.BUILD_RUNNING, f"Job {engine.job} is building engine {engine.key}.{serving}")


def serving(model: Optional[DeepSeekModel], deployment: Optional[dict]) -> ConditionValue:
    if deployment is None:
        return ConditionValue("False", Reason.WAITING_FOR_ENGINE, "Triton is deployed once the engine is built.")
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    available = int(status.get("availableReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    if available >= 1:
        return ConditionValue("True", Reason.DEPLOYMENT_AVAILABLE,
                              f"{ready} Triton replica(s) ready, serving engine {deployed_key(deployment)}.")
    autoscaled = model is not None and model.spec.autoscaling.enabled
    if spec.get("replicas") == 0 and not autoscaled:
        return ConditionValue("False", Reason.SCALED_TO_ZERO, "spec.serving.replicas is 0.")
    name = deployment["metadata"]["name"]
    return ConditionValue(
        "False", Reason.DEPLOYMENT_UNAVAILABLE,
        f"No Triton replica of Deployment {name} is available yet; if this lasts, check "
        f"`kubectl describe deployment {name}` and the pods' events (image, GPU capacity, probes).",
    )


def ready(model: DeepSeekModel, engine: EngineView, serving_value: ConditionValue,
          deployment: Optional[dict]) -> ConditionValue:
    key = engine.key
    if engine.state == EngineState.FAILED:
        return ConditionValue("False", Reason.BUILD_FAILED, engine.message)
    if engine.state in (EngineState.BUILDING, EngineState.WAITING, EngineState.ABSENT):
        if serving_value.status == "True":
            return ConditionValue("False", Reason.ENGINE_REBUILDING,
                                  f"Engine {key} is being built; the previous engine keeps serving.")
        return ConditionValue("False", Reason.WAITING_FOR_ENGINE, f"Engine {key} is being built.")
    if serving_value.status != "True":
        return ConditionValue("False", serving_value.reason, serving_value.message)
    meta, status = deployment["metadata"], deployment.get("status") or {}
    rolled = (
        deployed_key(deployment) == key
        and int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        and int(status.get("updatedReplicas") or 0) >= int(status.get("replicas") or 0)
    )
    if not rolled:
        return ConditionValue("False", Reason.ROLLING_OUT,
                              f"Deployment {meta['name']} is rolling out engine {key} and the serving settings.")
    return ConditionValue("True", Reason.MODEL_READY, f"Serving {model.name} with engine {key}.")


def engine_status(model: DeepSeekModel, engine: EngineView) -> dict[str, Any]:
    out: dict[str, Any] = {"cacheKey": engine.key, "location": render.engine_location(model, engine.key)}
    if engine.job:
        out["buildJob"] = engine.job
    if engine.state == EngineState.BUILT:
        out["reused"] = engine.reused
        if engine.built_at:
            out["builtAt"] = engine.built_at
        if engine.build_seconds is not None:
            out["buildSeconds"] = engine.build_seconds
    return out


def finish(previous: dict, current: dict[str, ConditionValue], generation: Optional[int], extra: dict[str, Any],
           now: str) -> Outcome:
    """The validated status (with None for keys to drop) and an event per condition transition."""
    events = []
    before = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, dict)}
    ours = set(vars(Reason).values())
    for ctype, value in current.items():
        old = before.get(ctype) or {}
        if (old.get("status"), old.get("reason")) != (value.status, value.reason):
            # A failed Job's own reason (BackoffLimitExceeded, DeadlineExceeded, ...) is not one of ours.
            warn = value.status == "False" and (value.reason in WARNING_REASONS or value.reason not in ours)
            events.append(("Warning" if warn else "Normal", value.reason, f"{ctype}={value.status}: {value.message}"))
    status = {
        "phase": derive_phase(current),
        "conditions": merge_conditions(previous.get("conditions"), current, generation, now),
        **({"observedGeneration": generation} if generation is not None else {}),
        **{k: v for k, v in extra.items() if v is not None},
    }
    wire = DeepSeekModelStatus.model_validate(status).wire()
    for key in previous:
        if key not in wire:
            wire[key] = None  # the merge patch drops what this reconcile no longer reports
    return Outcome(wire, events)


def invalid(previous: dict, problems: list[str], deployment: Optional[dict], generation: Optional[int],
            now: str) -> Outcome:
    message = "Fix the spec: " + "; ".join(problems)
    current = {
        ENGINE_BUILT: ConditionValue("False", Reason.INVALID_SPEC, message),
        SERVING: serving(None, deployment),
        READY: ConditionValue("False", Reason.INVALID_SPEC, message),
    }
    return finish(previous, current, generation, {}, now)


def claim_missing(model: DeepSeekModel, previous: dict, deployment: Optional[dict], now: str) -> Outcome:
    message = (
        f"The engine cache claim {model.spec.cache.claim_name!r} does not exist: create it, or set "
        "spec.cache.size so the operator creates it."
    )
    current = {
        ENGINE_BUILT: ConditionValue("False", Reason.CACHE_CLAIM_MISSING, message),
        SERVING: serving(model, deployment),
        READY: ConditionValue("False", Reason.CACHE_CLAIM_MISSING, message),
    }
    return finish(previous, current, model.generation, {}, now)


def derive(model: DeepSeekModel, previous: dict, engine: EngineView, live_key: Optional[str], served_key: Optional[str],
           deployment: Optional[dict], autoscaler_counts: Optional[dict], missing_autoscaler: Optional[dict],
           now: str) -> Outcome:
    """The status of a valid model after the sync."""
    extra: dict[str, Any] = {}
    if served_key:
        extra["endpoints"] = render.endpoints(model)
    if served_key == engine.key or not live_key:
        extra["engine"] = engine_status(model, engine)
    elif (previous.get("engine") or {}).get("cacheKey") == live_key:
        extra["engine"] = previous["engine"]
    else:
        extra["engine"] = {"cacheKey": live_key, "location": render.engine_location(model, live_key)}
    if deployment is not None:
        dstatus = deployment.get("status") or {}
        extra["replicas"] = int(dstatus.get("replicas") or 0)
        extra["readyReplicas"] = int(dstatus.get("readyReplicas") or 0)
    if model.spec.autoscaling.enabled:
        extra["autoscaling"] = {k: v for k, v in (autoscaler_counts or {}).items() if v is not None}
    current = {ENGINE_BUILT: engine_built(engine, live_key)}
    current[SERVING] = serving(model, deployment)
    current[READY] = ready(model, engine, current[SERVING], deployment)
    if missing_autoscaler is not None and current[READY].status == "True":
        current[READY] = ConditionValue(
            "False", Reason.AUTOSCALER_UNAVAILABLE,
            f"This cluster does not serve {missing_autoscaler['apiVersion']} {missing_autoscaler['kind']}: "
            "install KEDA, or set spec.autoscaling.metricsBackend to prometheus-adapter.",
        )
    return finish(previous, current, model.generation, extra, now)
