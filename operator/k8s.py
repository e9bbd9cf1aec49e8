"""The one module that talks to the Kubernetes API (through the kubernetes client's ApiClient).

Children are plain dicts (see render.py), so one generic path per verb serves
every kind.  ``apply`` is create-if-absent, patch-if-changed: the rendered
object's hash is kept in an annotation and compared on the next pass.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

#: kind -> (API path prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Event": ("/api/v1", "events"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    "DeepSeekModel": ("/apis/deepseek.ai/v1alpha1", "deepseekmodels"),
}
APPLIED_HASH = "deepseek.ai/applied-hash"


def default_api_client() -> ApiClient:
    """In-cluster service account, else the local kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


def rendered_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class Kube:
    """get / list / create / patch / delete / apply of namespaced objects given as dicts."""

    def __init__(self, api_client: ApiClient):
        self.api = api_client

    # ------------------------------------------------------------ raw verbs
    def _path(self, kind: str, namespace: str, name: Optional[str] = None, sub: Optional[str] = None) -> str:
        prefix, plural = RESOURCES[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    def _call(self, method: str, path: str, body: Any = None, query: Optional[list] = None,
              content_type: str = "application/json") -> Any:
        return self.api.call_api(
            path, method,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            response_types_map={200: "object", 201: "object", 202: "object"},
            _return_http_data_only=True,
        )

    def get(self, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        """The object, or None when it (or its whole resource type) does not exist."""
        try:
            return self._call("GET", self._path(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_optional(self, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        """Like get, for kinds the operator may not be allowed to read (KEDA's, when the chart leaves KEDA off)."""
        try:
            return self.get(kind, namespace, name)
        except ApiException as exc:
            if exc.status == 403:
                return None
            raise

    def list(self, kind: str, namespace: str, labels: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace matching ``labels`` (also filtered here: selectors are advisory)."""
        query = []
        if labels:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items())))
        try:
            items = self._call("GET", self._path(kind, namespace), query=query).get("items") or []
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        wanted = (labels or {}).items()
        return [i for i in items if wanted <= ((i.get("metadata") or {}).get("labels") or {}).items()]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self._call("POST", self._path(obj["kind"], meta["namespace"]), body=obj)

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any],
              subresource: Optional[str] = None) -> dict[str, Any]:
        """A JSON merge patch."""
        return self._call("PATCH", self._path(kind, namespace, name, subresource), body=body,
                          content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self._call("DELETE", self._path(kind, namespace, name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    # ------------------------------------------------------------ desired state
    def create_if_absent(self, obj: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """(created?, live object); never modifies an existing one."""
        meta = obj["metadata"]
        live = self.get(obj["kind"], meta["namespace"], meta["name"])
        if live is not None:
            return False, live
        try:
            return True, self.create(obj)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return False, self.get(obj["kind"], meta["namespace"], meta["name"]) or obj

    def apply(self, obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Create, or merge-patch when the rendering changed since the last apply: 'created'|'updated'|'unchanged'."""
        digest = rendered_hash(obj)
        desired = json.loads(json.dumps(obj))
        desired["metadata"].setdefault("annotations", {})[APPLIED_HASH] = digest
        meta = obj["metadata"]
        live = self.get(obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            try:
                return "created", self.create(desired)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                live = self.get(obj["kind"], meta["namespace"], meta["name"]) or {}
        if ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_HASH) == digest:
            return "unchanged", live
        body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
        return "updated", self.patch(obj["kind"], meta["namespace"], meta["name"], body)
