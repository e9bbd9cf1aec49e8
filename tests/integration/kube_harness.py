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


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the object metadata a real API server maintains."""

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
        if request.resource is not None and isinstance(request.data, (dict, list)):
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                self._stamp_new(request.data)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._stamp_patch(request)
        return await super()._handle(request)

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

    def __init__(self, url: str, config: OperatorConfig, timer_interval: float = 2.0):
        self.url = url
        self.operator = handlers.Operator(kube_client(url), config)

        async def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

        self.registry = handlers.build_registry(self.operator, login=login, timer_interval=timer_interval)
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
