"""The one module that talks to the Kubernetes API (through the kubernetes client's ApiClient).

Children are plain dicts (see render.py), so one generic path per verb serves
every kind.  ``apply`` is server-side apply with the operator's field manager:
one request creates a child or puts back the fields the operator owns (a hand
edit included), and leaves fields other managers own (an HPA's replica count).
"""

from __future__ import annotations

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
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
}
#: The field manager of the operator's server-side applies.
FIELD_MANAGER = "deepseek-operator"
#: A second manager that holds ``spec.replicas`` for a moment when an autoscaler takes the count over, so that
#: the operator's next apply (without replicas) releases it instead of deleting it (Kubernetes' documented handover).
REPLICAS_HANDOVER_MANAGER = "deepseek-operator-replicas-handover"


def default_api_client() -> ApiClient:
    """In-cluster service account, else the local kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


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

    def json_patch(self, kind: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """A JSON patch (RFC 6902); a failed ``test`` operation is answered 422 (409 on some servers)."""
        return self._call("PATCH", self._path(kind, namespace, name), body=ops,
                          content_type="application/json-patch+json")

    # ------------------------------------------------------------ desired state
    def create_if_absent(self, obj: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """(created?, live object); never modifies an existing one (one request when it does not exist yet)."""
        meta = obj["metadata"]
        try:
            return True, self.create(obj)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return False, self.get(obj["kind"], meta["namespace"], meta["name"]) or obj

    def apply(self, obj: dict[str, Any], manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply: create the object, or make the fields ``manager`` sets equal ``obj``; the live object.

        Fields ``manager`` applied before and ``obj`` no longer sets are removed, unless another manager
        also owns them; fields owned by others only (an HPA's ``spec.replicas``) are left alone.  ``force``
        takes back fields someone else changed by hand: that is how drift is repaired.
        """
        meta = obj["metadata"]
        return self._call(
            "PATCH", self._path(obj["kind"], meta["namespace"], meta["name"]), body=obj,
            query=[("fieldManager", manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )


def owns_field(live: Optional[dict[str, Any]], manager: str, path: tuple[str, ...]) -> bool:
    """Does ``manager`` own ``path`` (e.g. ``("spec", "replicas")``) through an Apply, per ``metadata.managedFields``?"""
    for entry in ((live or {}).get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        node = entry.get("fieldsV1") or {}
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, dict) else None
            if node is None:
                break
        else:
            return True
    return False
