"""A Kubernetes API on loopback (kmock's emulator) and the real operator running against it.

The emulator is an in-memory API server.  A real one also stamps every object
with ``uid``, ``resourceVersion``, ``generation`` and ``creationTimestamp``,
names ``generateName`` objects and refuses a JSON patch whose ``test`` fails;
:class:`ApiServer` adds exactly that (kopf's finalizer patch and the kubernetes
client's owner references depend on it).  Its hook, ``_handle``, is private:
kmock is pinned to 0.8 in pyproject.

The test plays the cluster's other controllers (Job, Deployment, garbage
collector) through the real kubernetes client.
"""

from __future__ import annotations

import asyncio
import copy
import json
import datetime
import itertools
import logging
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Optional

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
from kmock._internal import dicts as kmock_dicts  # the emulator's own patch semantics
from kmock._internal.k8s import KubernetesError
from kubernetes.client import ApiClient, Configuration

from deepseek_operator import api, engine_key as cachekey, handlers, naming
from deepseek_operator.config import OperatorConfig
from deepseek_operator.k8s import Kube

NAMESPACE = "models"
CR_RESOURCE = f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Unprocessable(KubernetesError):
    """HTTP 422, as a real API server answers a JSON patch whose ``test`` operation fails."""

    status = 422
    reason = "Invalid"
    message = "the JSON patch's test operation failed"


class Conflict(KubernetesError):
    """HTTP 409, as a real API server answers an apply without force that changes another manager's field."""

    status = 409
    reason = "Conflict"
    message = "Apply failed with conflicts: a field is owned by another manager"


# ---------------------------------------------------------------- server-side apply, as the emulator needs it
Path = tuple  # a field path, e.g. ("spec", "replicas"); lists are atomic leaves, as for lists without merge keys
#: What a manager never owns: identity and server-maintained fields.
UNOWNED = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"), ("metadata", "uid"),
           ("metadata", "resourceVersion"), ("metadata", "generation"), ("metadata", "creationTimestamp"),
           ("metadata", "managedFields")}


def leaf_paths(obj: Any, prefix: Path = ()) -> set:
    """Every leaf of a dict (a scalar, a list, or an empty dict) as a path."""
    if isinstance(obj, dict) and obj:
        out: set = set()
        for key, value in obj.items():
            out |= leaf_paths(value, prefix + (key,))
        return {p for p in out if p not in UNOWNED and p[:1] != ("status",)}
    return {prefix} if prefix else set()


def _get(obj: Any, path: Path) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return KeyError
        obj = obj[part]
    return obj


def _delete(obj: dict, path: Path) -> None:
    parents = [obj]
    for part in path[:-1]:
        nxt = parents[-1].get(part)
        if not isinstance(nxt, dict):
            return
        parents.append(nxt)
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):  # drop maps the deletion left empty
        if parents[depth] == {}:
            parents[depth - 1].pop(path[depth - 1], None)


def _merge(base: Any, applied: Any) -> Any:
    if isinstance(base, dict) and isinstance(applied, dict):
        out = dict(base)
        for key, value in applied.items():
            out[key] = _merge(base.get(key), value)
        return out
    return copy.deepcopy(applied)


def _overlaps(a: Path, b: Path) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def fields_v1(paths: set) -> dict:
    """Paths in the API's managedFields form: {"f:spec": {"f:replicas": {}}}."""
    root: dict = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    for path in paths:  # a path owned itself and through children: mark it with "."
        node = root
        for part in path:
            node = node[f"f:{part}"]
        if node and "." not in node:
            node["."] = {}
    return root


def paths_of(fields: dict, prefix: Path = ()) -> set:
    out: set = set()
    children = {k: v for k, v in fields.items() if k.startswith("f:")}
    if not children or "." in fields:
        if prefix:
            out.add(prefix)
    for key, value in children.items():
        out |= paths_of(value, prefix + (key[2:],))
    return out


def managers(obj: dict) -> dict:
    """{(manager, operation): paths} from metadata.managedFields."""
    out: dict = {}
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        out[(entry["manager"], entry["operation"])] = paths_of(entry.get("fieldsV1") or {})
    return out


def with_managers(obj: dict, owned: dict, api_version: str) -> dict:
    entries = [{"manager": m, "operation": op, "apiVersion": api_version, "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(paths)} for (m, op), paths in sorted(owned.items()) if paths]
    obj.setdefault("metadata", {})["managedFields"] = entries
    return obj


def server_side_apply(live: Optional[dict], applied: dict, manager: str, force: bool) -> dict:
    """The object after ``manager`` applies ``applied``: its fields set, its dropped fields removed unless
    another manager owns them, fields only others own left alone (Kubernetes' structured-merge rules, with lists
    atomic).  409 on a conflict without ``force``."""
    live = copy.deepcopy(live or {})
    owned = managers(live)
    mine = leaf_paths(applied)
    changed = {p for p in mine if _get(live, p) != _get(applied, p)}
    for who, paths in owned.items():
        if who == (manager, "Apply"):
            continue
        taken = {q for q in paths if any(_overlaps(q, p) for p in changed)}
        if taken and not force:
            raise Conflict()
        owned[who] = paths - taken
    before = owned.get((manager, "Apply"), set())
    others = set().union(*[p for w, p in owned.items() if w != (manager, "Apply")]) if owned else set()
    for path in before - mine:
        if not any(_overlaps(path, q) for q in others):
            _delete(live, path)
    result = _merge(live, applied)
    owned[(manager, "Apply")] = mine
    return with_managers(result, owned, applied.get("apiVersion", "v1"))


def record_update(live: dict, patch: dict, manager: str) -> dict:
    """managedFields after a merge patch by ``manager``: it owns what it set; what it changed, others lose."""
    owned = managers(live)
    set_paths = {p for p in leaf_paths(patch) if _get(patch, p) is not None}
    cleared = {p for p in leaf_paths(patch) if _get(patch, p) is None}
    changed = {p for p in set_paths if _get(live, p) != _get(patch, p)} | cleared
    for who, paths in owned.items():
        if who != (manager, "Update"):
            owned[who] = {q for q in paths if not any(_overlaps(q, p) for p in changed)}
    owned[(manager, "Update")] = owned.get((manager, "Update"), set()) | set_paths
    return {"metadata": {"managedFields": with_managers({}, owned, live.get("apiVersion", "v1"))["metadata"][
        "managedFields"]}}


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the object metadata a real API server maintains, and server-side apply."""

    _versions = itertools.count(1)

    async def __call__(self, raw_request):  # type: ignore[override]
        # kmock 0.8's path parser reads ``/api/v1/namespaces`` as "namespace <missing>" and answers 500;
        # kopf lists and watches that path when it serves named namespaces (``run --namespace``).
        if raw_request.path == "/api/v1/namespaces" and raw_request.method == "GET":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request):
        items = [obj.raw for (resource, _, _), obj in list(self.objects.items())
                 if str(resource.plural) == "namespaces" and not obj.deleted]
        if raw_request.query.get("watch") not in ("true", "1"):
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "NamespaceList",
                                              "metadata": {"resourceVersion": "1"}, "items": items})
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        timeout = float(raw_request.query.get("timeoutSeconds") or 3600)
        await asyncio.sleep(timeout)  # namespaces do not change in these tests; the client reconnects
        await response.write_eof()
        return response

    async def _handle(self, request):  # type: ignore[override]
        served = [request]
        try:
            return await self._handle_stamped(request, served)
        finally:
            # kmock routes each request by scanning every request it has kept (66 ms a request after ~1,000);
            # forget a request once answered: in-flight ones (watches) stay visible to the tests.
            for done in served:
                self._forget(done)

    def _forget(self, request) -> None:
        for i in range(len(self._requests) - 1, -1, -1):
            if self._requests[i] is request:
                del self._requests[i]
                return

    async def _handle_stamped(self, request, served: list):
        if request.resource is None or not isinstance(request.data, (dict, list)):
            return await super()._handle(request)
        if not hasattr(self, "_writes"):
            self._writes = asyncio.Lock()
        # One write at a time from stamping to storing, so a JSON patch's test sees what it patches.
        async with self._writes:
            if request.action == kmock.action.UPDATE and request.name is not None and self._is_apply(request):
                request = self._replace_request(request, self._apply(request))
                served.append(request)
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                self._stamp_new(request.data)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._stamp_patch(request)
            return await super()._handle(request)

    @staticmethod
    def _is_apply(request) -> bool:
        return (request.headers.get("Content-Type") or "").startswith("application/apply-patch")

    def _replace_request(self, old, new):
        """kmock routes only requests it has recorded: record the rewritten one in the original's place."""
        for i in range(len(self._requests) - 1, -1, -1):
            if self._requests[i] is old:
                self._requests[i] = new
                break
        return new

    def _apply(self, request):
        """Server-side apply, turned into what kmock serves: a create, a merge patch, or (no change) a read."""
        manager = request.params.get("fieldManager")
        if not manager:
            raise Unprocessable()  # the API server requires a field manager for apply
        force = request.params.get("force") in ("true", "1")
        key = (request.resource, request.namespace, request.name)
        exists = key in self.objects and not self.objects[key].deleted
        live = copy.deepcopy(self.objects[key].raw) if exists else None
        result = server_side_apply(live, request.data, manager, force)
        if not exists:
            result["metadata"].setdefault("namespace", request.namespace)
            return attrs.evolve(request, action=kmock.action.CREATE, method="POST", data=result)
        if result == live:
            return attrs.evolve(request, action=kmock.action.FETCH, method="GET", data=None)
        return attrs.evolve(request, data=merge_patch_between(live, result))

    def _stamp_new(self, obj: dict) -> None:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta["resourceVersion"] = str(next(self._versions))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", now())

    def _stamp_patch(self, request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the emulator answers 404
        current = copy.deepcopy(self.objects[key].raw)
        if isinstance(request.data, dict) and request.subresource != "status" and not self._is_apply(request):
            manager = request.params.get("fieldManager") or "unknown"
            request.data.update(kmock_dicts.merge_patch_dict(
                {"metadata": request.data.get("metadata") or {}}, record_update(current, request.data, manager)))
        try:
            patched = kmock_dicts.patch_dict(current, request.data)
        except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchException):
            raise Unprocessable() from None
        version = str(next(self._versions))
        bump_generation = request.subresource != "status" and patched.get("spec") != current.get("spec")
        generation = int((current.get("metadata") or {}).get("generation") or 1) + (1 if bump_generation else 0)
        if isinstance(request.data, dict):
            request.data.setdefault("metadata", {})
            if request.data["metadata"] is None:
                request.data["metadata"] = {}
            request.data["metadata"]["resourceVersion"] = version
            request.data["metadata"]["generation"] = generation
        else:
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            request.data.append({"op": "add", "path": "/metadata/generation", "value": generation})


def merge_patch_between(old: dict, new: dict) -> dict:
    """The JSON merge patch that turns ``old`` into ``new`` (None deletes a key)."""
    patch: dict = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = merge_patch_between(old[key], value)
            if sub:
                patch[key] = sub
        elif old.get(key, KeyError) != value:
            patch[key] = value
    return patch


def declare_resources(server: kmock.KubernetesEmulator) -> None:
    """Built-in types, the DeepSeekModel, and the namespace the tests use."""
    with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib.resources call
        warnings.filterwarnings("ignore", "read_binary is deprecated", DeprecationWarning)
        server.resources.load_bundled()
    server.resources[CR_RESOURCE] = kmock.ResourceInfo(
        kind=api.KIND,
        singular=api.SINGULAR,
        namespaced=True,
        shortnames=set(api.SHORT_NAMES),
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        subresources={"status"},
    )
    server.objects["v1/namespaces", None, NAMESPACE] = {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "uid": str(uuid.uuid4()), "resourceVersion": "1"},
    }


def kube_client(url: str) -> Kube:
    """The kubernetes client pointed at the emulator through its Configuration (as a kubeconfig would)."""
    conf = Configuration(host=url)
    return Kube(ApiClient(conf))


class RunningOperator:
    """The real operator (kopf + our handlers) in its own thread and event loop."""

    def __init__(self, url: str, config: OperatorConfig):
        self.url = url
        self.operator = handlers.Operator(kube_client(url), config)

        async def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

        self.registry = handlers.build_registry(self.operator, login=login)
        self.settings = handlers.operator_settings(error_backoffs=(0.2, 0.5, 1.0))
        self.settings.watching.reconnect_backoff = 0.2
        self.thread: Optional[threading.Thread] = None
        self.stop_flag: Optional[threading.Event] = None

    def start(self) -> "RunningOperator":
        """kopf in its own thread and loop: at shutdown it cancels tasks it did not start, so not in the test's loop."""
        self.stop_flag = threading.Event()

        def main() -> None:
            asyncio.run(kopf.operator(registry=self.registry, settings=self.settings, standalone=True,
                                      namespaces=[NAMESPACE], stop_flag=self.stop_flag))

        self.thread = threading.Thread(target=main, name="kopf", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "kopf did not stop"
        self.thread = None


class Cluster:
    """The test's hands: the kubernetes client, the emulator's state, and the other controllers' moves."""

    def __init__(self, server: kmock.KubernetesEmulator):
        self.server = server
        self.url = str(server.url).rstrip("/")
        self.kube = kube_client(self.url)

    # ------------------------------------------------------------ client calls (off the loop that serves the API)
    async def call(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, kind: str, name: str) -> Optional[dict]:
        return await self.call(self.kube.get, kind, NAMESPACE, name)

    async def create_model(self, name: str, spec: dict) -> dict:
        body = {"apiVersion": api.API_VERSION, "kind": api.KIND,
                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
        return await self.call(self.kube.create, body)

    async def patch_spec(self, name: str, spec_patch: dict) -> dict:
        return await self.call(self.kube.patch, api.KIND, NAMESPACE, name, {"spec": spec_patch})

    async def edit(self, kind: str, name: str, patch: dict, manager: str = "kubectl-edit") -> dict:
        """A merge patch by another field manager, as ``kubectl edit`` or an HPA's scale update sends it."""
        kube = self.kube
        return await self.call(lambda: kube._call("PATCH", kube._path(kind, NAMESPACE, name), body=patch,
                                                  query=[("fieldManager", manager)],
                                                  content_type="application/merge-patch+json"))

    async def delete(self, kind: str, name: str) -> bool:
        return await self.call(self.kube.delete, kind, NAMESPACE, name)

    async def list(self, kind: str) -> list[dict]:
        return await self.call(self.kube.list, kind, NAMESPACE, None)

    # ------------------------------------------------------------ waiting
    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = await predicate()
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    async def wait_model(self, name: str, check: Callable[[dict], bool], timeout: float = 20.0,
                         what: str = "status") -> dict:
        async def probe():
            obj = await self.get(api.KIND, name)
            return obj if obj and check(obj) else None

        try:
            return await self.wait_for(probe, timeout, what)
        except AssertionError:
            obj = await self.get(api.KIND, name)
            raise AssertionError(f"{name}: timed out waiting for {what}; status is {(obj or {}).get('status')}")

    async def wait_phase(self, name: str, phase: str, timeout: float = 20.0) -> dict:
        return await self.wait_model(name, lambda o: (o.get("status") or {}).get("phase") == phase, timeout,
                                     f"phase {phase}")

    async def wait_watching(self, timeout: float = 20.0) -> None:
        """Until kopf's WATCH on deepseekmodels has arrived (objects created earlier would still be listed)."""
        async def watching():
            return len(self.server[kmock.action.WATCH, kmock.resource(api.GROUP, api.VERSION, api.PLURAL)]) > 0

        await self.wait_for(watching, timeout, "kopf's watch on deepseekmodels")

    def watched_namespaces(self) -> set:
        """Namespaces of kopf's watches on deepseekmodels (None for a cluster-wide watch)."""
        watches = self.server[kmock.action.WATCH, kmock.resource(api.GROUP, api.VERSION, api.PLURAL)]
        return {request.namespace for request in watches}

    # ------------------------------------------------------------ the other controllers
    async def finish_job(self, name: str, succeeded: bool, reason: str = "BackoffLimitExceeded",
                         message: str = "Job has reached the specified backoff limit") -> None:
        """What the Job controller writes when the build pod exits."""
        start = now()
        if succeeded:
            status = {"startTime": start, "completionTime": now(), "succeeded": 1,
                      "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                     {"type": "Complete", "status": "True", "lastTransitionTime": now()}]}
        else:
            status = {"startTime": start, "failed": 2,
                      "conditions": [{"type": "FailureTarget", "status": "True", "reason": reason},
                                     {"type": "Failed", "status": "True", "reason": reason, "message": message,
                                      "lastTransitionTime": now()}]}
        await self.call(self.kube.patch, "Job", NAMESPACE, name, {"status": status}, "status")

    async def make_available(self, name: str) -> None:
        """What the Deployment controller writes once the current pod template's replicas are ready."""
        dep = await self.get("Deployment", name)
        replicas = dep["spec"].get("replicas", 1)
        status = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
        }
        await self.call(self.kube.patch, "Deployment", NAMESPACE, name, {"status": status}, "status")

    async def collect_garbage(self, owner_uid: str) -> list[str]:
        """What the garbage collector does after an owner is gone: delete objects that name it as owner."""
        deleted = []
        for kind in ("Job", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            for obj in await self.list(kind):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs):
                    await self.delete(kind, obj["metadata"]["name"])
                    deleted.append(f"{kind}/{obj['metadata']['name']}")
        return deleted


def condition(obj: dict, ctype: str) -> dict:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return cond
    return {}


def build_job_for(name: str, key: str) -> str:
    return naming.build_job_name(name, key)


#: A small CPU model spec the operator tests start from.
SPEC = {
    "model": {"source": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": "abc123"},
    "engine": {"backend": "onnxruntime", "precision": "fp32", "maxBatchSize": 4},
    "serving": {"gpusPerReplica": 0, "replicas": 1},
}


def key_of(spec: dict) -> str:
    """The engine cache key the operator computes for ``spec``."""
    return cachekey.spec_key(api.parse_spec(spec))


logging.getLogger("kopf").setLevel(logging.INFO)
