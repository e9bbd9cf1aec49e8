"""Desired children of a DeepSeekModel, as pure functions of the validated spec and the operator config.

Nothing here talks to the API or reads the clock: the same (model, config, key)
always renders the same objects.  ``k8s.py`` compares them with what exists and
acts; ``handlers.py`` decides which to apply when.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from deepseek_model_repository.config import server_flags
from deepseek_model_repository.probe import PING_TIMEOUT_S, probe_command
from deepseek_model_repository.repository import DEFAULT_PREFILL_TOKENS, DEFAULT_STREAM_INTERVAL
from deepseek_model_repository.supervise import supervise_command

from . import autoscaling, engine_key, naming
from deepseek_contract.engine import gpu_type_for
from .api import (API_VERSION, BUILDER_RESOURCES, CREDENTIALS_MESSAGE, CREDENTIALS_PATTERN, EXIT_MARGIN_SECONDS, KIND,
                  PRESTOP_SECONDS, SpecError, REPOSITORY_RESOURCES, TRITON_RESOURCES, DeepSeekModel,
                  ResourceRequirements)
from .config import OperatorConfig

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
CACHE_MOUNT = "/cache"
MODELS_MOUNT = "/models"
PVC_SOURCE_MOUNT = "/mnt/pvc"
#: Namespace-level ConfigMap that records which engines the cache holds (never owned by a model).
ENGINE_INDEX = "deepseek-engine-index"
#: Non-root user of the Triton and operator images.
RUN_AS_USER = 1000


# ---------------------------------------------------------------- shared pieces
def owner_reference(model: DeepSeekModel) -> Optional[dict[str, Any]]:
    """The controller reference every child carries (None for a model not read from a cluster: no uid)."""
    if not model.uid:
        return None
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": model.name,
        "uid": model.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(model: DeepSeekModel, name: str, component: str, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": model.namespace,
        "labels": naming.standard_labels(model.name, component),
    }
    owner = owner_reference(model) if owned else None
    if owner:
        meta["ownerReferences"] = [owner]
    return meta


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    """Pod Security Standards 'restricted', and a read-only root: containers write only to declared volumes."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


#: The writable scratch every container gets (HOME and caches point into it): an emptyDir at /tmp.
SCRATCH_VOLUME = {"name": "tmp", "emptyDir": {}}
SCRATCH_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
SCRATCH_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"}]

_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
             "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}


def quantity_value(quantity: str) -> float:
    """A Kubernetes quantity (already validated by the API) as a number, to compare requests with limits."""
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(quantity)


def container_resources(user: ResourceRequirements, defaults: dict[str, dict[str, str]],
                        extra_limits: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Requests and limits: the CR's keys over the defaults; a request never above its limit."""
    limits = {**defaults["limits"], **user.limits, **(extra_limits or {})}
    requests = {**defaults["requests"], **user.requests}
    for name, request in list(requests.items()):
        limit = limits.get(name)
        if isinstance(limit, str) and name not in user.requests and quantity_value(request) > quantity_value(limit):
            requests[name] = limit  # the CR lowered the limit only: the default request follows it down
    return {"requests": requests, "limits": limits}


def _scheduling(model: DeepSeekModel) -> dict[str, Any]:
    serving = model.spec.serving
    out: dict[str, Any] = {}
    if serving.node_selector:
        out["nodeSelector"] = dict(serving.node_selector)
    if serving.tolerations:
        out["tolerations"] = [t.wire() for t in serving.tolerations]
    return out


def _with_pull_policy(container: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    if config.image_pull_policy:
        container["imagePullPolicy"] = config.image_pull_policy
    return container


def _pvc_claims(*sources: Optional[str]) -> list[str]:
    """Claims named by pvc:// sources, in order, without duplicates."""
    claims: list[str] = []
    for source in sources:
        if source and source.startswith("pvc://"):
            claim = source[len("pvc://"):].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def engine_ref_path(spec_key: str) -> str:
    """Where the builder writes, and the init container reads, the ref of an engine."""
    return f"{CACHE_MOUNT}/refs/{spec_key}.json"


def engine_location(model: DeepSeekModel, spec_key: str) -> str:
    """status.engine.location: the ref on the cache claim."""
    return f"pvc://{model.spec.cache.claim_name}/refs/{spec_key}.json"


def index_key(claim_name: str, spec_key: str) -> str:
    """Key of an engine in the index ConfigMap (a valid ConfigMap data key: [-._a-zA-Z0-9]+)."""
    return f"{claim_name}.{spec_key}"


# ---------------------------------------------------------------- cache
def render_cache_claim(model: DeepSeekModel) -> Optional[dict[str, Any]]:
    """The engine cache claim when spec.cache.size asks the operator to create it; no owner: it outlives models."""
    cache = model.spec.cache
    if cache.size is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": cache.claim_name,
            "namespace": model.namespace,
            "labels": {
                "app.kubernetes.io/name": "deepseek-engine-cache",
                "app.kubernetes.io/component": "engine-cache",
                "app.kubernetes.io/part-of": naming.PART_OF,
                "app.kubernetes.io/managed-by": naming.MANAGED_BY,
            },
        },
        "spec": spec,
    }


def render_index_entry(model: DeepSeekModel, spec_key: str, job: str, built_at: Optional[str],
                       build_seconds: Optional[float]) -> dict[str, str]:
    """One data entry of the engine index ConfigMap."""
    value = {"builtAt": built_at, "buildSeconds": build_seconds, "job": job, "model": model.name}
    return {index_key(model.spec.cache.claim_name, spec_key): json.dumps(value, sort_keys=True)}


def render_engine_index(namespace: str) -> dict[str, Any]:
    """The (empty) engine index ConfigMap of a namespace; entries are added as builds succeed."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ENGINE_INDEX,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "deepseek-engine-index",
                "app.kubernetes.io/component": "engine-cache",
                "app.kubernetes.io/part-of": naming.PART_OF,
                "app.kubernetes.io/managed-by": naming.MANAGED_BY,
            },
        },
        "data": {},
    }


# ---------------------------------------------------------------- build Job
def build_command(model: DeepSeekModel) -> list[str]:
    """The builder's CLI for this model's engine (credentials come from the Secret's env, never from here)."""
    spec = model.spec
    for source in (spec.model.source, spec.model.adapter.source if spec.model.adapter else ""):
        if re.match(CREDENTIALS_PATTERN, source):  # the API refuses these; a model built around it still may not
            raise SpecError([f"spec.model.source {CREDENTIALS_MESSAGE}"])
    args = ["deepseek-operator", "build", "--source", spec.model.source]
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if spec.model.adapter:
        args += ["--adapter", spec.model.adapter.source]
        if spec.model.adapter.revision:
            args += ["--adapter-revision", spec.model.adapter.revision]
    args += [
        "--task", spec.model.task,
        "--backend", spec.engine.backend,
        "--precision", spec.engine.precision,
        "--max-batch-size", str(spec.engine.max_batch_size),
        "--max-seq-len", str(spec.engine.max_sequence_length),
        "--gpu-type", gpu_type_for(spec.serving.gpus_per_replica, spec.serving.node_selector),
        "--cache-dir", CACHE_MOUNT,
        "--output", "/tmp/repository",
        "--model-name", naming.triton_model_name(model.name),
    ]
    return args


def render_build_job(model: DeepSeekModel, config: OperatorConfig, spec_key: str) -> dict[str, Any]:
    """The engine-build Job for ``spec_key``: one per key, few retries, kept after it finishes (the operator reads it)."""
    spec = model.spec
    name = naming.build_job_name(model.name, spec_key)
    meta = _metadata(model, name, "engine-build")
    meta["labels"][naming.SPEC_KEY_LABEL] = spec_key
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name}},
        dict(SCRATCH_VOLUME),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": CACHE_MOUNT},
        dict(SCRATCH_MOUNT),
    ]
    adapter = spec.model.adapter.source if spec.model.adapter else None
    for i, claim in enumerate(_pvc_claims(spec.model.source, adapter)):
        volumes.append({"name": f"source-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"source-{i}", "mountPath": f"{PVC_SOURCE_MOUNT}/{claim}", "readOnly": True})
    container: dict[str, Any] = {
        "name": "builder",
        "image": config.builder_image,
        "command": build_command(model),
        "env": [*SCRATCH_ENV, {"name": "HF_HOME", "value": "/tmp/huggingface"}],
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
        "resources": container_resources(spec.engine.builder_resources, BUILDER_RESOURCES,
                                         {"nvidia.com/gpu": 1} if spec.engine.backend == "tensorrt" else None),
    }
    if spec.model.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.model.credentials_secret}}]
    pod_labels = dict(meta["labels"])
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": config.build_backoff_limit,
            "activeDeadlineSeconds": config.build_deadline_seconds,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security_context(),
                    "containers": [_with_pull_policy(container, config)],
                    "volumes": volumes,
                    **_scheduling(model),
                },
            },
        },
    }


# ---------------------------------------------------------------- Triton
def repository_command(model: DeepSeekModel, spec_key: str) -> list[str]:
    """The init container's command: write the Triton repository for the engine named by ``spec_key``."""
    serving = model.spec.serving
    args = [
        "deepseek-operator", "repository",
        "--engine-ref", engine_ref_path(spec_key),
        "--output", MODELS_MOUNT,
        "--model-name", naming.triton_model_name(model.name),
        "--max-queue-delay-us", str(serving.dynamic_batching.queue_delay_us(model.spec.model.task)),
    ]
    for size in serving.dynamic_batching.preferred_batch_sizes:
        args += ["--preferred-batch-size", str(size)]
    # The default writes no flag, so the Deployments of CRs that do not set it keep their pod template.
    if serving.stream_interval != DEFAULT_STREAM_INTERVAL:
        args += ["--stream-interval", str(serving.stream_interval)]
    if serving.engine_threads:
        args += ["--engine-threads", str(serving.engine_threads)]
    if serving.request_timeout_seconds:
        args += ["--request-timeout-seconds", f"{serving.request_timeout_seconds:g}"]
    if not serving.prefix_sharing:
        args += ["--no-prefix-sharing"]
    if serving.prefill_chunk_tokens != DEFAULT_PREFILL_TOKENS:
        args += ["--prefill-chunk-tokens", str(serving.prefill_chunk_tokens)]
    args += ["--gpus", str(serving.gpus_per_replica)]
    return args


def triton_args(model: DeepSeekModel) -> list[str]:
    return [
        "tritonserver",
        f"--model-repository={MODELS_MOUNT}",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--allow-gpu-metrics=true",
        # On SIGTERM Triton refuses new requests and waits this long for its models' requests to end.
        f"--exit-timeout-secs={model.spec.serving.drain_seconds}",
    ] + server_flags()


def _triton_resources(model: DeepSeekModel) -> dict[str, Any]:
    serving = model.spec.serving
    gpus = {"nvidia.com/gpu": serving.gpus_per_replica} if serving.gpus_per_replica > 0 else None
    return container_resources(serving.resources, TRITON_RESOURCES, gpus)


def _liveness_probe(model: DeepSeekModel) -> dict[str, Any]:
    """Triton's own liveness, and for text generation whether the model's processes answer: Triton keeps a model
    whose Python process died ready, failing its every request (``deepseek_model_repository.probe``)."""
    probe: dict[str, Any] = {"httpGet": {"path": "/v2/health/live", "port": "http"}}
    if model.spec.model.task == "text-generation":
        probe = {"exec": {"command": probe_command(HTTP_PORT, naming.triton_model_name(model.name))},
                 "timeoutSeconds": int(PING_TIMEOUT_S) + 5}
    return {**probe, "initialDelaySeconds": 30, "periodSeconds": 10, "failureThreshold": 6}


def render_deployment(model: DeepSeekModel, config: OperatorConfig, spec_key: str) -> dict[str, Any]:
    """Triton serving the engine ``spec_key``; without ``replicas`` when an autoscaler owns the count."""
    spec = model.spec
    name = naming.triton_name(model.name)
    meta = _metadata(model, name, "triton")
    selector = naming.selector_labels(model.name, "triton")
    cache_mount = {"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": True}
    models_mount = {"name": "models", "mountPath": MODELS_MOUNT}
    init = {
        "name": "model-repository",
        "image": config.operator_image,
        "command": repository_command(model, spec_key),
        "env": list(SCRATCH_ENV),
        "volumeMounts": [cache_mount, models_mount, dict(SCRATCH_MOUNT)],
        "securityContext": _container_security_context(),
        "resources": container_resources(spec.serving.init_resources, REPOSITORY_RESOURCES),
    }
    triton: dict[str, Any] = {
        "name": "triton",
        "image": spec.serving.image,
        # tritonserver under a watch that ends it when Triton lost a model's process as it initialized (Triton then
        # never serves, and the startup probe would wait 10 minutes) or when one died (Triton never starts it again
        # and keeps the model ready): the kubelet starts the container again at once.
        "command": supervise_command(triton_args(model)),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": _liveness_probe(model),
        # Loading a large engine takes minutes: hold liveness off until Triton answers once.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 60,
        },
        "env": list(SCRATCH_ENV),
        "volumeMounts": [cache_mount, models_mount, {"name": "dshm", "mountPath": "/dev/shm"}, dict(SCRATCH_MOUNT)],
        "securityContext": _container_security_context(),
        "resources": _triton_resources(model),
    }
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": {
                "labels": naming.standard_labels(model.name, "triton"),
                "annotations": {naming.ENGINE_KEY_ANNOTATION: spec_key},
            },
            "spec": {
                "automountServiceAccountToken": False,
                "securityContext": _pod_security_context(),
                "terminationGracePeriodSeconds": PRESTOP_SECONDS + spec.serving.drain_seconds + EXIT_MARGIN_SECONDS,
                "initContainers": [_with_pull_policy(init, config)],
                "containers": [triton],
                "volumes": [
                    {"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name, "readOnly": True}},
                    {"name": "models", "emptyDir": {}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    dict(SCRATCH_VOLUME),
                ],
                **_scheduling(model),
            },
        },
    }
    if not spec.autoscaling.enabled:
        deployment_spec = {"replicas": spec.serving.replicas, **deployment_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": deployment_spec}


def render_service(model: DeepSeekModel) -> dict[str, Any]:
    """ClusterIP Service in front of the Triton pods: HTTP, gRPC and metrics."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(model, naming.triton_name(model.name), "triton"),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector_labels(model.name, "triton"),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def wants_pdb(model: DeepSeekModel) -> bool:
    """More than one replica may serve: keep at least one through voluntary disruptions."""
    spec = model.spec
    if spec.autoscaling.enabled:
        return spec.autoscaling.max_replicas > 1
    return spec.serving.replicas > 1


def render_pdb(model: DeepSeekModel) -> Optional[dict[str, Any]]:
    """A PodDisruptionBudget allowing one Triton pod down at a time, when more than one replica serves."""
    if not wants_pdb(model):
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(model, naming.triton_name(model.name), "triton"),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": naming.selector_labels(model.name, "triton")},
        },
    }


def render_autoscaler(model: DeepSeekModel) -> list[dict[str, Any]]:
    """The HPA or ScaledObject (autoscaling.py), or [] when autoscaling is off."""
    owner = owner_reference(model)
    objs = autoscaling.render_autoscaler(model, owner or {})
    if owner is None:
        for obj in objs:
            obj["metadata"].pop("ownerReferences", None)
    return objs


def endpoints(model: DeepSeekModel) -> dict[str, str]:
    """status.endpoints: in-cluster URLs of the Triton Service."""
    host = f"{naming.triton_name(model.name)}.{model.namespace}.svc"
    return {
        "http": f"http://{host}:{HTTP_PORT}",
        "grpc": f"{host}:{GRPC_PORT}",
        "metrics": f"http://{host}:{METRICS_PORT}/metrics",
    }


def render_serving(model: DeepSeekModel, config: OperatorConfig, spec_key: str) -> list[dict[str, Any]]:
    """Deployment, Service, then the PDB and autoscaler when wanted."""
    objs = [render_deployment(model, config, spec_key), render_service(model)]
    pdb = render_pdb(model)
    if pdb:
        objs.append(pdb)
    objs.extend(render_autoscaler(model))
    return objs


def render_children(model: DeepSeekModel, config: OperatorConfig) -> list[dict[str, Any]]:
    """Everything the operator would create for a model from an empty cache: claim, build Job, serving objects."""
    key = engine_key.spec_key(model.spec)
    objs: list[dict[str, Any]] = []
    claim = render_cache_claim(model)
    if claim:
        objs.append(claim)
    objs.append(render_build_job(model, config, key))
    objs.extend(render_serving(model, config, key))
    return objs
