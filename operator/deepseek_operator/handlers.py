"""kopf handlers: thin.  Each parses what kopf hands over and calls the one-way reconcile (``reconcile.py``).

A model is reconciled when it is created, changed or resumed, and when one of its
children (build Job, Deployment, Service, PDB, HPA) changes or disappears, so a
hand edit or deletion brings it back (watches, not timers: an idle model costs no
API call).  A build Job's change also wakes the models that wait for it.

Lifecycle of one model:

1. the engine for the spec's key is found in the engine index (reused, no Job), or
   built by one Job per key and cache: the first model claims the build (a Lease),
   the others wait for it (``engine_state.py``);
2. once that engine is built, the Triton Deployment points at it (a new key rolls
   the pods; until then the previous engine keeps serving);
3. Ready when the Deployment has rolled out the current engine and is available.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Optional

import kopf

from . import metrics, naming, reconcile as reconciling
from .api import GROUP, KIND, PLURAL, VERSION
from .conditions import Reason
from .config import OperatorConfig
from .k8s import Kube

log = logging.getLogger("deepseek_operator")


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
        self.config = config
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: (namespace, engine key) -> models waiting for that build: who to wake when its Job changes.
        #: Only a wake-up list: the claim itself lives in the cluster, and a restart rebuilds this on resume.
        self._waiters: dict[tuple[str, str], set[str]] = {}
        self._waiting_on: dict[tuple[str, str], str] = {}
        #: Prunable child kinds known to exist per model, as this process applied them (absent: not known yet,
        #: so the model's first reconcile deletes every kind it does not render).
        self._children: dict[tuple[str, str], set[str]] = {}
        #: Models with a reconcile queued and not started: a later trigger is folded into it (it reads fresh state).
        self._queued: set[tuple[str, str]] = set()

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def reconcile(self, namespace: str, name: str, logger: logging.Logger | None = None) -> Optional[dict]:
        """Reconcile the model as it is now in the API; returns the status written (None if it is gone or queued)."""
        ident = (namespace, name)
        if ident in self._queued:
            return None
        self._queued.add(ident)
        async with self._lock(namespace, name):
            self._queued.discard(ident)
            obj = await asyncio.to_thread(self.kube.get, "DeepSeekModel", namespace, name)
            if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
                return None
            try:
                result = await asyncio.to_thread(reconciling.reconcile, self.kube, self.config, obj,
                                                 self._children.get(ident))
            except Exception:
                metrics.RECONCILES.labels(result="error").inc()
                self._children.pop(ident, None)  # not known any more: the next reconcile prunes in full
                raise
            if result.applied is not None:
                self._children[ident] = result.applied
            self._note_waiting(namespace, name, result.waiting_on)
            outcome = result.outcome
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
            deleted = await asyncio.to_thread(reconciling.delete_children, self.kube, namespace, name, uid)
        self._locks.pop((namespace, name), None)
        self._children.pop((namespace, name), None)
        self._note_waiting(namespace, name, None)
        metrics.record_phase(namespace, name, None)
        if deleted:
            log.info("%s/%s: deleted %s", namespace, name, ", ".join(deleted))

    def _note_waiting(self, namespace: str, name: str, key: Optional[str]) -> None:
        before = self._waiting_on.pop((namespace, name), None)
        if before is not None:
            self._waiters.get((namespace, before), set()).discard(name)
        if key is not None:
            self._waiting_on[(namespace, name)] = key
            self._waiters.setdefault((namespace, key), set()).add(name)

    async def reconcile_owner(self, body: Any, logger: logging.Logger) -> None:
        """A child changed: reconcile the DeepSeekModel that owns it (and, for a build Job, those waiting on it)."""
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace")
        owners = [ref["name"] for ref in meta.get("ownerReferences") or []
                  if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/")]
        key = (meta.get("labels") or {}).get(naming.SPEC_KEY_LABEL) if body.get("kind") == "Job" else None
        waiting = sorted(self._waiters.get((namespace, key), ())) if key else []
        names = owners + [w for w in waiting if w not in owners]
        await asyncio.gather(*(self.reconcile(namespace, n, logger) for n in names))

    async def count_build(self, body: Any) -> None:
        """A build Job finished: count it once in the metrics."""
        await asyncio.to_thread(reconciling.count_outcome, self.kube, dict(body))


#: Children whose change or deletion brings their model back to a reconcile (KEDA's ScaledObject is not watched:
#: the operator may not be allowed to read it, and KEDA itself keeps it).
CHILD_RESOURCES = (("batch/v1", "jobs"), ("apps/v1", "deployments"), ("v1", "services"),
                   ("policy/v1", "poddisruptionbudgets"), ("autoscaling/v2", "horizontalpodautoscalers"))


def wakes_owner(body: Any, type: Optional[str]) -> bool:
    """Does this watch event of a child call for its model's reconcile?

    Not the initial listing (None: the models' resume handlers cover it), not a creation (ADDED: the operator
    created it; but a new build Job does, so the models waiting for its engine name it), and not the annotation
    that marks a finished Job counted; every other change and every deletion does.
    """
    if type is None or (type == "ADDED" and body.get("kind") != "Job"):
        return False
    if type == "MODIFIED" and body.get("kind") == "Job":
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        return reconciling.OUTCOME_ANNOTATION not in annotations
    return True


def build_registry(
    operator: Operator,
    *,
    login: Optional[Callable[..., Any]] = None,
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

    @kopf.on.delete(**resource)
    async def delete_model(namespace: str, name: str, uid: str, body: Any, **_: Any) -> None:
        await operator.delete(namespace, name, uid, body)

    for group_version, plural in CHILD_RESOURCES:
        @kopf.on.event(group_version, plural, labels=managed, registry=registry, id=f"child-{plural}")
        async def child_changed(body: Any, type: Optional[str], logger: logging.Logger, **_: Any) -> None:
            if body.get("kind") == "Job":
                await operator.count_build(body)
            if wakes_owner(body, type):
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
