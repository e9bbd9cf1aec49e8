"""One reconcile of a DeepSeekModel, in one direction: observe, then decide, then act.

* **observe** reads what the decision needs: the engine index entry, the build
  claim (a Lease), the Job it names, the claim's holder, the live Deployment;
* **decide** is pure: :func:`engine_state.derive_engine` gives the engine's state
  and action, :class:`children.Desired` which children should exist;
* **act** takes the engine action (claim, take over, record), then syncs the
  children table (server-side apply, or delete when a renderer returns None),
  and derives the status (``status.py``) from what the API answered.

Runs in a worker thread (the kubernetes client is synchronous); ``handlers.py``
calls it.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from kubernetes.client.exceptions import ApiException

from . import engine_key, engine_state, metrics, naming, render, status
from .api import API_VERSION, KIND, DeepSeekModel, SpecError, parse_resource
from .autoscaling import autoscaler_status
from .children import AUTOSCALER_KINDS, Desired, keda_hpa_name, render_all
from .config import OperatorConfig
from .engine_state import EngineAction, EngineState, EngineView
from .k8s import FIELD_MANAGER, REPLICAS_HANDOVER_MANAGER, Kube, owns_field

log = logging.getLogger("deepseek_operator")

#: Set on a finished build Job once its outcome is counted (metrics), so a restart does not count it twice.
OUTCOME_ANNOTATION = "deepseek.ai/build-outcome"
#: Rounds of observe-decide-act on the engine when another model wins a claim race first.
CLAIM_ROUNDS = 4


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Result:
    """What a reconcile wrote, and the engine key a waiting model waits on (for waking it when that Job changes)."""

    outcome: status.Outcome
    waiting_on: Optional[str] = None
    #: The prunable child kinds that exist after this reconcile (None: not known).
    applied: Optional[set[str]] = None


# ---------------------------------------------------------------- observe
@dataclass
class EngineFacts:
    entry: Optional[dict[str, Any]]
    lease: Optional[dict]
    job: Optional[dict]
    holder_wants_key: Optional[bool]


def _index_entry(kube: Kube, namespace: str, cache_claim: str, key: str) -> Optional[dict[str, Any]]:
    index = kube.get("ConfigMap", namespace, render.ENGINE_INDEX)
    raw = ((index or {}).get("data") or {}).get(render.index_key(cache_claim, key))
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def _holder_wants(kube: Kube, namespace: str, holder: Optional[str], key: str) -> bool:
    """Does the claim's holder still exist and name this engine?"""
    if not holder:
        return False
    obj = kube.get(KIND, namespace, holder)
    if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
        return False
    try:
        other = parse_resource({**obj, "apiVersion": API_VERSION, "kind": KIND})
    except SpecError:
        return False
    return engine_key.spec_key(other.spec) == key


def observe_engine(kube: Kube, model: DeepSeekModel, key: str) -> EngineFacts:
    ns, cache_claim = model.namespace, model.spec.cache.claim_name
    entry = _index_entry(kube, ns, cache_claim, key)
    if entry is not None:
        return EngineFacts(entry, None, None, None)
    lease = kube.get("Lease", ns, engine_state.claim_name(cache_claim, key))
    job_name = engine_state.lease_job(lease) or naming.build_job_name(model.name, key)
    job = kube.get("Job", ns, job_name)
    holder = engine_state.lease_holder(lease)
    wants = None
    if lease is not None and holder != model.name and job is None:
        wants = _holder_wants(kube, ns, holder, key)
    return EngineFacts(entry, lease, job, wants)


# ---------------------------------------------------------------- act on the engine
def _record(kube: Kube, model: DeepSeekModel, view: EngineView) -> None:
    key = render.index_key(model.spec.cache.claim_name, view.key)
    data = {key: json.dumps(engine_state.index_entry(view), sort_keys=True)}
    try:
        kube.patch("ConfigMap", model.namespace, render.ENGINE_INDEX, {"data": data})
    except ApiException as exc:
        if exc.status != 404:
            raise
        created, _ = kube.create_if_absent({**render.render_engine_index(model.namespace), "data": data})
        if not created:
            kube.patch("ConfigMap", model.namespace, render.ENGINE_INDEX, {"data": data})


def _lost_race(exc: ApiException) -> bool:
    return exc.status in (409, 422)


def settle_engine(kube: Kube, model: DeepSeekModel, key: str) -> tuple[EngineView, bool]:
    """Observe, derive and act on the engine until no other model's move interferes; (view, start the Job?)."""
    own_job = naming.build_job_name(model.name, key)
    ns, cache_claim = model.namespace, model.spec.cache.claim_name
    view = None
    for _ in range(CLAIM_ROUNDS):
        facts = observe_engine(kube, model, key)
        view = engine_state.derive_engine(
            key=key, model=model.name, namespace=ns, own_job_name=own_job, entry=facts.entry, lease=facts.lease,
            job=facts.job, holder_wants_key=facts.holder_wants_key,
        )
        building = EngineView(key, EngineState.BUILDING, job=own_job, holder=model.name)
        try:
            if view.action == EngineAction.CLAIM:
                kube.create(engine_state.render_claim(ns, cache_claim, key, model.name, view.job))
                if view.state == EngineState.ABSENT:
                    return building, True
                return view, False  # an own Job from before claims existed: now claimed
            if view.action == EngineAction.TAKE_OVER:
                kube.json_patch("Lease", ns, engine_state.claim_name(cache_claim, key),
                                engine_state.takeover_patch(engine_state.lease_holder(facts.lease), model.name, own_job))
                log.info("%s/%s: took over the build of engine %s from %s", ns, model.name, key,
                         engine_state.lease_holder(facts.lease))
                return building, True
        except ApiException as exc:
            if not _lost_race(exc):
                raise
            continue  # another model claimed or took over first: look again
        if view.action == EngineAction.RECORD:
            _record(kube, model, view)
        if view.action == EngineAction.CREATE_JOB:
            return building, True
        return view, False
    assert view is not None
    return view, False


# ---------------------------------------------------------------- sync the children
def _hand_over_replicas(kube: Kube, desired_deployment: dict, live: Optional[dict]) -> None:
    """When an autoscaler takes the count over, keep the live count instead of dropping it (which resets it to 1)."""
    if live is None or "replicas" in desired_deployment["spec"]:
        return
    if not owns_field(live, FIELD_MANAGER, ("spec", "replicas")):
        return
    meta = desired_deployment["metadata"]
    kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                "spec": {"replicas": (live.get("spec") or {}).get("replicas", 1)}}, manager=REPLICAS_HANDOVER_MANAGER)


def sync(kube: Kube, model: DeepSeekModel, config: OperatorConfig, desired: Desired, live_deployment: Optional[dict],
         served_before: bool, known: Optional[set[str]] = None) -> dict[str, Any]:
    """Apply every rendered child and delete the prunable ones rendered as None; the live objects by kind.

    ``known`` is the prunable kinds this process knows exist for the model (None: unknown, so every prunable
    kind rendered as None is deleted; a 404 is fine).
    """
    live: dict[str, Any] = {}
    for child, obj in render_all(model, config, desired):
        if obj is None:
            prunable = child.prune and (served_before or not child.serving) and child.name is not None
            if prunable and (known is None or child.kind in known):
                try:
                    kube.delete(child.kind, model.namespace, child.name(model))
                except ApiException as exc:
                    if exc.status != 403:  # not allowed to see KEDA's kinds: there is none of ours to delete
                        raise
            continue
        if child.sync == "ensure":
            meta = obj["metadata"]
            live[child.kind] = kube.get(child.kind, meta["namespace"], meta["name"]) or kube.create_if_absent(obj)[1]
            continue
        if child.sync == "create":
            created, live[child.kind] = kube.create_if_absent(obj)
            if created and child.kind == "Job":
                metrics.BUILDS_STARTED.inc()
                log.info("%s/%s: started build Job %s for engine %s", model.namespace, model.name,
                         obj["metadata"]["name"], desired.key)
            continue
        if child.kind == "Deployment":
            _hand_over_replicas(kube, obj, live_deployment)
        try:
            live[child.kind] = kube.apply(obj)
        except ApiException as exc:
            if child.kind not in AUTOSCALER_KINDS or exc.status != 404:
                raise
            live["missing-autoscaler"] = obj  # the cluster does not serve this API (e.g. no KEDA)
    return live


# ---------------------------------------------------------------- the reconcile
def built_by_status(model: DeepSeekModel, previous: dict, key: str) -> Optional[EngineView]:
    """The engine as the last status recorded it, when that status already says it is built for ``key``.

    The engine index only grows, so a built engine stays built: an idle model's reconcile reads no index.
    """
    engine = previous.get("engine") or {}
    built = next((c for c in previous.get("conditions") or [] if c.get("type") == "EngineBuilt"), {})
    if engine.get("cacheKey") != key or built.get("status") != "True":
        return None
    return EngineView(key, EngineState.BUILT, job=engine.get("buildJob"), reused=bool(engine.get("reused")),
                      built_at=engine.get("builtAt"), build_seconds=engine.get("buildSeconds"))


def reconcile(kube: Kube, config: OperatorConfig, obj: dict[str, Any], known: Optional[set[str]] = None) -> Result:
    """Observe, decide and act for one DeepSeekModel as read from the API."""
    meta = obj.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    previous = obj.get("status") or {}
    try:
        model = parse_resource({**obj, "apiVersion": API_VERSION, "kind": KIND})
        key = engine_key.spec_key(model.spec)
        render_all(model, config, Desired(key, build=True, serve=key))  # renderer-side rules, before acting
    except SpecError as exc:
        deployment = kube.get("Deployment", namespace, naming.triton_name(name))
        return Result(status.invalid(previous, exc.problems, deployment, meta.get("generation"), now()))

    if model.spec.cache.size is None and kube.get("PersistentVolumeClaim", namespace,
                                                  model.spec.cache.claim_name) is None:
        deployment = kube.get("Deployment", namespace, naming.triton_name(name))
        return Result(status.claim_missing(model, previous, deployment, now()))

    # Observe and decide.
    view, build = built_by_status(model, previous, key), False
    if view is None:
        view, build = settle_engine(kube, model, key)
    built = view.state == EngineState.BUILT
    # The live Deployment matters when the engine is not built yet (which key it serves meanwhile), and for an
    # autoscaler taking the replica count over (who owns it).
    deployment = None
    if not built or model.spec.autoscaling.enabled:
        deployment = kube.get("Deployment", namespace, naming.triton_name(name))
    live_key = status.deployed_key(deployment)
    served_before = deployment is not None or bool(previous.get("endpoints"))
    if built:
        serve = key
    else:
        serve = live_key or ((previous.get("engine") or {}).get("cacheKey") if served_before else None)

    # Act.
    live = sync(kube, model, config, Desired(key, build=build, serve=serve, built=built), deployment, served_before,
                known)
    deployment = live.get("Deployment", deployment if serve else None)
    counts = None
    if model.spec.autoscaling.enabled:
        if model.spec.autoscaling.metrics_backend == "keda":
            counts = autoscaler_status(kube.get_optional("HorizontalPodAutoscaler", namespace, keda_hpa_name(model)) or {})
        else:
            counts = autoscaler_status(live.get("HorizontalPodAutoscaler") or {})
    outcome = status.derive(model, previous, view, live_key, serve, deployment, counts, live.get("missing-autoscaler"),
                            now())
    applied = {kind for kind in live if kind not in ("Job", "PersistentVolumeClaim", "missing-autoscaler")}
    return Result(outcome, waiting_on=key if view.state == EngineState.WAITING else None, applied=applied)


def delete_children(kube: Kube, namespace: str, name: str, uid: Optional[str]) -> list[str]:
    """Delete what a cluster's garbage collector would (the cache claim, engine index and build claims stay)."""
    deleted = []
    triton = naming.triton_name(name)
    for kind in ("HorizontalPodAutoscaler", "ScaledObject", "PodDisruptionBudget", "Service", "Deployment"):
        live = kube.get_optional(kind, namespace, triton)
        if live is not None and _owned_by(live, uid):
            kube.delete(kind, namespace, triton)
            deleted.append(f"{kind}/{triton}")
    for job in kube.list("Job", namespace, {naming.MODEL_LABEL: naming.label_value(name)}):
        if _owned_by(job, uid):
            kube.delete("Job", namespace, job["metadata"]["name"])
            deleted.append(f"Job/{job['metadata']['name']}")
    return deleted


def _owned_by(obj: dict, uid: Optional[str]) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == KIND and (uid is None or r.get("uid") == uid) for r in refs)


def count_outcome(kube: Kube, job: dict) -> Optional[str]:
    """Count a finished build Job in the metrics once (an annotation marks it counted); its outcome, if new."""
    meta = job.get("metadata") or {}
    if (meta.get("annotations") or {}).get(OUTCOME_ANNOTATION):
        return None
    if engine_state.job_succeeded(job):
        outcome = "succeeded"
        metrics.BUILDS_SUCCEEDED.inc()
        seconds = engine_state.build_seconds(job)
        if seconds is not None:
            metrics.BUILD_DURATION.observe(seconds)
    elif engine_state.job_condition(job, "Failed"):
        outcome = "failed"
        metrics.BUILDS_FAILED.inc()
    else:
        return None
    try:
        kube.patch("Job", meta["namespace"], meta["name"], {"metadata": {"annotations": {OUTCOME_ANNOTATION: outcome}}})
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile: counted, nothing to mark
            raise
    return outcome
