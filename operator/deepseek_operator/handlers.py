"""kopf handlers: one idempotent reconcile of a DeepSeekModel, triggered by the CR, its children and a timer.

The reconcile reads what exists, renders what should (render.py), applies the
difference (k8s.py) and writes status.  Lifecycle of one model:

1. the engine for the spec's cache key is found in the engine index (reused, no
   Job), or a build Job is created (one per key: a failed Job is never recreated);
2. once that engine is built, the Triton Deployment points at it (a new key rolls
   the pods; until then the previous engine keeps serving);
3. Ready when the Deployment has rolled out the current engine and is available.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import kopf
from kubernetes.client.exceptions import ApiException

from . import engine_key, metrics, naming, render
from .api import API_VERSION, GROUP, KIND, PLURAL, VERSION, DeepSeekModel, SpecError, parse_resource
from .autoscaling import autoscaler_hpa_name, autoscaler_status
from .conditions import ENGINE_BUILT, READY, SERVING, ConditionValue, Reason, derive_phase, merge_conditions
from .config import OperatorConfig
from .k8s import Kube

log = logging.getLogger("deepseek_operator")

#: Set on a finished build Job once its outcome is counted (metrics, index), so a restart does not count it twice.
OUTCOME_ANNOTATION = "deepseek.ai/build-outcome"
#: Reasons of a False condition that deserve a Warning event.
WARNING_REASONS = {Reason.INVALID_SPEC, Reason.CACHE_CLAIM_MISSING, Reason.BUILD_FAILED, Reason.DEPLOYMENT_UNAVAILABLE,
                   Reason.AUTOSCALER_UNAVAILABLE}
AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Optional[str]) -> Optional[datetime.datetime]:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _job_condition(job: dict, ctype: str) -> Optional[dict]:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


# ---------------------------------------------------------------- engine state
@dataclass
class Engine:
    """Where the engine for one cache key stands."""

    key: str
    state: str  # "ready", "building" or "failed"
    job: Optional[str] = None
    reused: bool = False
    built_at: Optional[str] = None
    build_seconds: Optional[float] = None
    reason: str = ""
    message: str = ""

    def status(self, model: DeepSeekModel) -> dict[str, Any]:
        out: dict[str, Any] = {"cacheKey": self.key, "location": render.engine_location(model, self.key)}
        if self.job:
            out["buildJob"] = self.job
        if self.state == "ready":
            out["reused"] = self.reused
            if self.built_at:
                out["builtAt"] = self.built_at
            if self.build_seconds is not None:
                out["buildSeconds"] = self.build_seconds
        return out


@dataclass
class Outcome:
    """What one reconcile decided: the new status and the events to post."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


class Reconciler:
    """The synchronous reconcile of one DeepSeekModel (runs in a worker thread)."""

    def __init__(self, kube: Kube, config: OperatorConfig):
        self.kube = kube
        self.config = config

    # ------------------------------------------------------------ engine index
    def _index_entry(self, namespace: str, claim: str, key: str) -> Optional[dict[str, Any]]:
        index = self.kube.get("ConfigMap", namespace, render.ENGINE_INDEX)
        raw = ((index or {}).get("data") or {}).get(render.index_key(claim, key))
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def _record_in_index(self, model: DeepSeekModel, key: str, job: str, built_at: Optional[str],
                         seconds: Optional[float]) -> None:
        entry = render.render_index_entry(model, key, job, built_at, seconds)
        created, _ = self.kube.create_if_absent({**render.render_engine_index(model.namespace), "data": entry})
        if not created:
            self.kube.patch("ConfigMap", model.namespace, render.ENGINE_INDEX, {"data": entry})

    def engine(self, model: DeepSeekModel, key: str, events: list) -> Engine:
        """Find the engine for ``key`` (index, or our Job), creating the build Job when neither has it."""
        job_name = naming.build_job_name(model.name, key)
        job = self.kube.get("Job", model.namespace, job_name)
        entry = self._index_entry(model.namespace, model.spec.cache.claim_name, key)
        if job is not None:
            return self._from_job(model, key, job, entry, events)
        if entry is not None:
            return Engine(key, "ready", job=entry.get("job"), reused=entry.get("job") != job_name,
                          built_at=entry.get("builtAt"), build_seconds=entry.get("buildSeconds"))
        self.kube.create_if_absent(render.render_build_job(model, self.config, key))
        metrics.BUILDS_STARTED.inc()
        log.info("%s/%s: started build Job %s for engine %s", model.namespace, model.name, job_name, key)
        return Engine(key, "building", job=job_name)

    def _from_job(self, model: DeepSeekModel, key: str, job: dict, entry: Optional[dict], events: list) -> Engine:
        name = job["metadata"]["name"]
        status = job.get("status") or {}
        recorded = ((job["metadata"].get("annotations") or {}).get(OUTCOME_ANNOTATION))
        if _job_condition(job, "Complete") or (status.get("succeeded") or 0) >= 1:
            start = _parse_time(status.get("startTime"))
            end = _parse_time(status.get("completionTime"))
            seconds = round((end - start).total_seconds(), 1) if start and end else None
            built_at = status.get("completionTime")
            if entry is None:
                self._record_in_index(model, key, name, built_at, seconds)
            if recorded is None:
                metrics.BUILDS_SUCCEEDED.inc()
                if seconds is not None:
                    metrics.BUILD_DURATION.observe(seconds)
                self.kube.patch("Job", model.namespace, name, {"metadata": {"annotations": {OUTCOME_ANNOTATION: "succeeded"}}})
            return Engine(key, "ready", job=name, built_at=built_at, build_seconds=seconds)
        failed = _job_condition(job, "Failed")
        if failed:
            if entry is not None:  # another model built the same engine meanwhile
                return Engine(key, "ready", job=entry.get("job"), reused=True, built_at=entry.get("builtAt"),
                              build_seconds=entry.get("buildSeconds"))
            if recorded is None:
                metrics.BUILDS_FAILED.inc()
                self.kube.patch("Job", model.namespace, name, {"metadata": {"annotations": {OUTCOME_ANNOTATION: "failed"}}})
            reason = failed.get("reason") or Reason.BUILD_FAILED
            detail = failed.get("message") or "the builder exited with an error"
            message = (
                f"Build Job {name} failed ({reason}: {detail}). See `kubectl logs -n {model.namespace} job/{name}`. "
                "It is not retried: fix the cause and change spec.model or spec.engine (a new engine key builds "
                "again), or delete the Job to retry the same engine."
            )
            return Engine(key, "failed", job=name, reason=reason, message=message)
        return Engine(key, "building", job=name)

    # ------------------------------------------------------------ serving
    def _apply_serving(self, model: DeepSeekModel, deploy_key: str) -> dict[str, Any]:
        """Deployment, Service, PDB and autoscaler for ``deploy_key``; stale PDB/autoscaler removed."""
        live: dict[str, Any] = {}
        for obj in render.render_serving(model, self.config, deploy_key):
            try:
                _, live[obj["kind"]] = self.kube.apply(obj)
            except ApiException as exc:
                if obj["kind"] not in AUTOSCALER_KINDS or exc.status != 404:
                    raise
                live["missing-autoscaler"] = obj  # the cluster does not serve this API (e.g. no KEDA)
        name = naming.triton_name(model.name)
        for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject"):
            if kind not in live and self.kube.get_optional(kind, model.namespace, name) is not None:
                self.kube.delete(kind, model.namespace, name)
        return live

    # ------------------------------------------------------------ the reconcile
    def reconcile(self, obj: dict[str, Any]) -> Outcome:
        meta = obj.get("metadata") or {}
        namespace, generation = meta.get("namespace"), meta.get("generation")
        previous = obj.get("status") or {}
        events: list[tuple[str, str, str]] = []
        name = meta.get("name")
        deployment = self.kube.get("Deployment", namespace, naming.triton_name(name))
        try:
            model = parse_resource({**obj, "apiVersion": API_VERSION, "kind": KIND})
            # Some rules live in the renderers (e.g. KEDA needs prometheusAddress): render once before acting.
            render.render_serving(model, self.config, engine_key.spec_key(model.spec))
        except SpecError as exc:
            message = "Fix the spec: " + "; ".join(exc.problems)
            current = {
                ENGINE_BUILT: ConditionValue("False", Reason.INVALID_SPEC, message),
                SERVING: self._serving(None, deployment, None),
                READY: ConditionValue("False", Reason.INVALID_SPEC, message),
            }
            return self._finish(previous, current, generation, {}, events)

        key = engine_key.spec_key(model.spec)
        claim = render.render_cache_claim(model)
        if claim is not None:
            self.kube.create_if_absent(claim)
        elif self.kube.get("PersistentVolumeClaim", namespace, model.spec.cache.claim_name) is None:
            message = (
                f"The engine cache claim {model.spec.cache.claim_name!r} does not exist: create it, or set "
                "spec.cache.size so the operator creates it."
            )
            current = {
                ENGINE_BUILT: ConditionValue("False", Reason.CACHE_CLAIM_MISSING, message),
                SERVING: self._serving(model, deployment, None),
                READY: ConditionValue("False", Reason.CACHE_CLAIM_MISSING, message),
            }
            return self._finish(previous, current, generation, {}, events)

        engine = self.engine(model, key, events)
        live_key = self._deployed_key(deployment)
        deploy_key = key if engine.state == "ready" else live_key
        extra: dict[str, Any] = {}
        missing_autoscaler = None
        if deploy_key:
            live = self._apply_serving(model, deploy_key)
            deployment = live["Deployment"]
            missing_autoscaler = live.get("missing-autoscaler")
            extra["endpoints"] = render.endpoints(model)
        if deploy_key == key or not live_key:
            extra["engine"] = engine.status(model)
        elif (previous.get("engine") or {}).get("cacheKey") == live_key:
            extra["engine"] = previous["engine"]
        else:
            extra["engine"] = {"cacheKey": live_key, "location": render.engine_location(model, live_key)}
        if deployment is not None:
            dstatus = deployment.get("status") or {}
            extra["replicas"] = int(dstatus.get("replicas") or 0)
            extra["readyReplicas"] = int(dstatus.get("readyReplicas") or 0)
        if model.spec.autoscaling.enabled:
            hpa = self.kube.get("HorizontalPodAutoscaler", namespace, autoscaler_hpa_name(model))
            counts = {k: v for k, v in autoscaler_status(hpa or {}).items() if v is not None}
            extra["autoscaling"] = counts
        else:
            extra["autoscaling"] = None  # the merge patch drops what an earlier autoscaler reported

        current = {ENGINE_BUILT: self._engine_built(engine, live_key)}
        current[SERVING] = self._serving(model, deployment, engine)
        current[READY] = self._ready(model, engine, current[SERVING], deployment, key)
        if missing_autoscaler is not None and current[READY].status == "True":
            current[READY] = ConditionValue(
                "False", Reason.AUTOSCALER_UNAVAILABLE,
                f"This cluster does not serve {missing_autoscaler['apiVersion']} {missing_autoscaler['kind']}: "
                "install KEDA, or set spec.autoscaling.metricsBackend to prometheus-adapter.",
            )
        return self._finish(previous, current, generation, extra, events)

    @staticmethod
    def _deployed_key(deployment: Optional[dict]) -> Optional[str]:
        if deployment is None:
            return None
        template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
        return (template.get("annotations") or {}).get(naming.ENGINE_KEY_ANNOTATION)

    @staticmethod
    def _engine_built(engine: Engine, live_key: Optional[str]) -> ConditionValue:
        if engine.state == "ready":
            if engine.reused:
                return ConditionValue("True", Reason.ENGINE_REUSED,
                                      f"Engine {engine.key} was already in the cache; no build was needed.")
            took = f" in {engine.build_seconds:g}s" if engine.build_seconds is not None else ""
            return ConditionValue("True", Reason.BUILD_SUCCEEDED, f"Job {engine.job} built engine {engine.key}{took}.")
        if engine.state == "failed":
            return ConditionValue("False", engine.reason, engine.message)
        serving = f" Engine {live_key} keeps serving until it finishes." if live_key and live_key != engine.key else ""
        return ConditionValue("Unknown", Reason.BUILD_RUNNING,
                              f"Job {engine.job} is building engine {engine.key}.{serving}")

    @staticmethod
    def _serving(model: Optional[DeepSeekModel], deployment: Optional[dict], engine: Optional[Engine]) -> ConditionValue:
        if deployment is None:
            return ConditionValue("False", Reason.WAITING_FOR_ENGINE,
                                  "Triton is deployed once the engine is built.")
        spec = deployment.get("spec") or {}
        status = deployment.get("status") or {}
        available = int(status.get("availableReplicas") or 0)
        ready = int(status.get("readyReplicas") or 0)
        key = Reconciler._deployed_key(deployment)
        if available >= 1 or any(c.get("type") == "Available" and c.get("status") == "True" and available
                                 for c in status.get("conditions") or []):
            return ConditionValue("True", Reason.DEPLOYMENT_AVAILABLE,
                                  f"{ready} Triton replica(s) ready, serving engine {key}.")
        autoscaled = model is not None and model.spec.autoscaling.enabled
        if spec.get("replicas") == 0 and not autoscaled:
            return ConditionValue("False", Reason.SCALED_TO_ZERO, "spec.serving.replicas is 0.")
        name = deployment["metadata"]["name"]
        return ConditionValue(
            "False", Reason.DEPLOYMENT_UNAVAILABLE,
            f"No Triton replica of Deployment {name} is available yet; if this lasts, check "
            f"`kubectl describe deployment {name}` and the pods' events (image, GPU capacity, probes).",
        )

    @staticmethod
    def _ready(model: DeepSeekModel, engine: Engine, serving: ConditionValue, deployment: Optional[dict],
               key: str) -> ConditionValue:
        if engine.state == "failed":
            return ConditionValue("False", Reason.BUILD_FAILED, engine.message)
        if engine.state == "building":
            if serving.status == "True":
                return ConditionValue("False", Reason.ENGINE_REBUILDING,
                                      f"Engine {key} is being built; the previous engine keeps serving.")
            return ConditionValue("False", Reason.WAITING_FOR_ENGINE, f"Engine {key} is being built.")
        if serving.status != "True":
            return ConditionValue("False", serving.reason, serving.message)
        meta, status = deployment["metadata"], deployment.get("status") or {}
        rolled = (
            Reconciler._deployed_key(deployment) == key
            and int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
            and int(status.get("updatedReplicas") or 0) >= int(status.get("replicas") or 0)
        )
        if not rolled:
            return ConditionValue("False", Reason.ROLLING_OUT,
                                  f"Deployment {meta['name']} is rolling out engine {key} and the serving settings.")
        return ConditionValue("True", Reason.MODEL_READY, f"Serving {model.name} with engine {key}.")

    @staticmethod
    def _finish(previous: dict, current: dict[str, ConditionValue], generation: Optional[int],
                extra: dict[str, Any], events: list) -> Outcome:
        before = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, dict)}
        for ctype, value in current.items():
            old = before.get(ctype) or {}
            if (old.get("status"), old.get("reason")) != (value.status, value.reason):
                # A failed Job's own reason (BackoffLimitExceeded, DeadlineExceeded, ...) is not one of ours.
                ours = value.reason in vars(Reason).values()
                warn = value.status == "False" and (value.reason in WARNING_REASONS or not ours)
                events.append(("Warning" if warn else "Normal", value.reason, f"{ctype}={value.status}: {value.message}"))
        status = {
            "phase": derive_phase(current),
            "conditions": merge_conditions(previous.get("conditions"), current, generation, _now()),
            **({"observedGeneration": generation} if generation is not None else {}),
            **extra,
        }
        return Outcome(status, events)

    # ------------------------------------------------------------ deletion
    def delete_children(self, namespace: str, name: str, uid: Optional[str]) -> list[str]:
        """Delete what a cluster's garbage collector would (the cache claim and engine index stay)."""
        deleted = []
        triton = naming.triton_name(name)
        for kind in ("HorizontalPodAutoscaler", "ScaledObject", "PodDisruptionBudget", "Service", "Deployment"):
            live = self.kube.get_optional(kind, namespace, triton)
            if live is not None and _owned_by(live, uid):
                self.kube.delete(kind, namespace, triton)
                deleted.append(f"{kind}/{triton}")
        for job in self.kube.list("Job", namespace, {naming.MODEL_LABEL: naming.label_value(name)}):
            if _owned_by(job, uid):
                self.kube.delete("Job", namespace, job["metadata"]["name"])
                deleted.append(f"Job/{job['metadata']['name']}")
        return deleted


def _owned_by(obj: dict, uid: Optional[str]) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == KIND and (uid is None or r.get("uid") == uid) for r in refs)


def _status_changed(old: dict, new: dict) -> bool:
    """Would merge-patching ``new`` change ``old``? (None removes a key; removing an absent key changes nothing.)"""
    merged = {**old, **new}
    merged = {k: v for k, v in merged.items() if v is not None}
    return json.dumps(old, sort_keys=True) != json.dumps(merged, sort_keys=True)


# ---------------------------------------------------------------- the kopf side
class Operator:
    """Serializes reconciles per model and bridges kopf (async) and the client (sync, in threads)."""

    def __init__(self, kube: Kube, config: OperatorConfig):
        self.kube = kube
        self.reconciler = Reconciler(kube, config)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def reconcile(self, namespace: str, name: str, logger: logging.Logger | None = None) -> Optional[dict]:
        """Reconcile the model as it is now in the API; returns the status written (None if it is gone)."""
        async with self._lock(namespace, name):
            obj = await asyncio.to_thread(self.kube.get, "DeepSeekModel", namespace, name)
            if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
                return None
            try:
                outcome = await asyncio.to_thread(self.reconciler.reconcile, obj)
            except Exception:
                metrics.RECONCILES.labels(result="error").inc()
                raise
            invalid = any(c["reason"] == Reason.INVALID_SPEC for c in outcome.status["conditions"])
            metrics.RECONCILES.labels(result="invalid" if invalid else "success").inc()
            old = obj.get("status") or {}
            if _status_changed(old, outcome.status):
                await asyncio.to_thread(self.kube.patch, "DeepSeekModel", namespace, name,
                                        {"status": outcome.status}, "status")
            metrics.record_phase(namespace, name, outcome.status["phase"])
            for etype, reason, message in outcome.events:
                kopf.event(obj, type=etype, reason=reason, message=message)
            if old.get("phase") != outcome.status["phase"]:
                (logger or log).info("%s/%s: phase %s -> %s", namespace, name, old.get("phase"),
                                     outcome.status["phase"])
            return outcome.status

    async def delete(self, namespace: str, name: str, uid: Optional[str], body: Any) -> None:
        async with self._lock(namespace, name):
            deleted = await asyncio.to_thread(self.reconciler.delete_children, namespace, name, uid)
        self._locks.pop((namespace, name), None)
        metrics.record_phase(namespace, name, None)
        if deleted:
            log.info("%s/%s: deleted %s", namespace, name, ", ".join(deleted))

    async def reconcile_owner(self, body: Any, logger: logging.Logger) -> None:
        """A child changed: reconcile the DeepSeekModel that owns it."""
        meta = body.get("metadata") or {}
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
                await self.reconcile(meta.get("namespace"), ref["name"], logger)


def build_registry(
    operator: Operator,
    *,
    login: Optional[Callable[..., Any]] = None,
    timer_interval: float = 30.0,
) -> kopf.OperatorRegistry:
    """A kopf registry with our handlers (no module-level state: tests build as many as they like)."""
    registry = kopf.OperatorRegistry()
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)
    managed = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}

    kopf.on.login(registry=registry)(login or kopf.login_via_client)

    @kopf.on.resume(**resource)
    @kopf.on.create(**resource)
    @kopf.on.update(**resource)
    async def reconcile_model(namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
        await operator.reconcile(namespace, name, logger)

    @kopf.timer(**resource, interval=timer_interval, initial_delay=timer_interval)
    async def resync_model(namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
        await operator.reconcile(namespace, name, logger)

    @kopf.on.delete(**resource)
    async def delete_model(namespace: str, name: str, uid: str, body: Any, **_: Any) -> None:
        await operator.delete(namespace, name, uid, body)

    for group_version, plural in (("batch/v1", "jobs"), ("apps/v1", "deployments"),
                                  ("autoscaling/v2", "horizontalpodautoscalers")):
        group, version = group_version.split("/")

        @kopf.on.event(group, version, plural, labels=managed, registry=registry, id=f"child-{plural}")
        async def child_changed(body: Any, type: Optional[str], logger: logging.Logger, **_: Any) -> None:
            if type is not None:  # None is the initial listing; the CR's resume handler covers it
                await operator.reconcile_owner(body, logger)

    return registry


def operator_settings(error_backoffs: tuple[float, ...] | None = None) -> kopf.OperatorSettings:
    """kopf's bookkeeping in deepseek.ai/ annotations, none in status."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="deepseek.ai")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="deepseek.ai")
    settings.persistence.finalizer = "deepseek.ai/finalizer"
    settings.posting.level = logging.WARNING  # only our explicit events, not kopf's log lines
    if error_backoffs:
        settings.networking.error_backoffs = error_backoffs
    return settings


def run_operator(config: OperatorConfig, liveness_url: Optional[str] = None) -> None:
    """``deepseek-operator run``: metrics server, then kopf in standalone mode until SIGTERM."""
    from .k8s import default_api_client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics.serve(config.metrics_port)
    operator = Operator(Kube(default_api_client()), config)
    registry = build_registry(operator)
    namespaces = list(config.watch_namespaces)
    asyncio.run(
        kopf.operator(
            registry=registry,
            settings=operator_settings(),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness_url,
        )
    )
