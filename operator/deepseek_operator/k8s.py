"""The one module that talks to the Kubernetes API (through the kubernetes client's ApiClient).

Children are plain dicts (see render.py), so one generic path per verb serves
every kind.  ``apply`` is create-if-absent, patch-if-changed: the rendered
object's hash is kept in an annotation and compared on the next pass.
"""

from __future__ import annotations

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
#: The operator's last rendering of a child (JSON), for three-way patches.
LAST_APPLIED = "deepseek.ai/last-applied"
#: Fields left alone when a new rendering drops them: an autoscaler owns the replica count.
KEEP_WHEN_DROPPED: dict[str, tuple[tuple[str, ...], ...]] = {"Deployment": (("spec", "replicas"),)}


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
        """Create, or patch when the rendering changed since the last apply: 'created'|'updated'|'unchanged'.

        The last rendering is kept in an annotation (as ``kubectl apply`` does), so a field the new
        rendering drops is removed from the live object instead of lingering.
        """
        rendered = json.loads(json.dumps(obj))
        desired = json.loads(json.dumps(obj))
        desired["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(rendered, sort_keys=True)
        meta = obj["metadata"]
        live = self.get(obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            try:
                return "created", self.create(desired)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                live = self.get(obj["kind"], meta["namespace"], meta["name"]) or {}
        previous_text = ((live.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
        try:
            previous = json.loads(previous_text) if previous_text else {}
        except ValueError:
            previous = {}
        if previous == rendered:
            return "unchanged", live
        body = three_way_patch(previous, desired, keep=KEEP_WHEN_DROPPED.get(obj["kind"], ()))
        body.pop("apiVersion", None)
        body.pop("kind", None)
        return "updated", self.patch(obj["kind"], meta["namespace"], meta["name"], body)


def three_way_patch(last: Any, desired: Any, keep: tuple[tuple[str, ...], ...] = (), _path: tuple = ()) -> Any:
    """A JSON merge patch to ``desired`` that also deletes (null) what ``last`` applied and ``desired`` dropped.

    Fields nobody applied (set by the API server or other controllers) are left alone; so are ``keep``
    paths, e.g. a Deployment's ``spec.replicas`` once an autoscaler owns it (dropping it would reset it to 1).
    """
    if not isinstance(desired, dict):
        return desired
    patch: dict[str, Any] = {}
    last = last if isinstance(last, dict) else {}
    for key, value in desired.items():
        patch[key] = three_way_patch(last.get(key), value, keep, _path + (key,))
    for key in last:
        if key not in desired and _path + (key,) not in keep:
            patch[key] = None
    return patch
