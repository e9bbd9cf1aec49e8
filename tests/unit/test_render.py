"""Renderers: pure functions of (model, config) whose output Kubernetes accepts."""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest

from deepseek_operator import api, engine_key as cachekey, naming, render
from deepseek_operator.config import OperatorConfig

K8S_VERSION = "1.35.0"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
UID = "6f1c1d2e-1111-4222-8333-444455556666"
CONFIG = OperatorConfig(builder_image="registry.example/builder:1", operator_image="registry.example/operator:1")


def make_model(name: str = "r1", spec_patch: dict | None = None, uid: str | None = UID) -> api.DeepSeekModel:
    spec = {"model": {"source": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": "abc123"}}
    for path, value in (spec_patch or {}).items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    meta = {"name": name, "namespace": "models"}
    if uid:
        meta["uid"] = uid
    return api.parse_resource({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta, "spec": spec})


CPU = {"engine.backend": "onnxruntime", "engine.precision": "fp32", "serving.gpusPerReplica": 0}
AUTOSCALED = {"autoscaling.enabled": True, "autoscaling.minReplicas": 2, "autoscaling.maxReplicas": 6}
KEDA = {**AUTOSCALED, "autoscaling.metricsBackend": "keda", "autoscaling.prometheusAddress": "http://prom:9090"}
SCHEDULED = {
    "serving.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "serving.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}

VARIANTS = {
    "defaults": {},
    "cpu": CPU,
    "autoscaled": AUTOSCALED,
    "replicated": {"serving.replicas": 3},
    "scheduled": SCHEDULED,
    "credentials-and-adapter": {
        "model.credentialsSecret": "hf-token",
        "model.adapter": {"source": "pvc://adapters/lora-1", "revision": "v2"},
    },
    "existing-cache": {"cache.size": None, "cache.claimName": "shared-engines"},
    "resources": {"serving.resources": {"limits": {"cpu": "8", "memory": "64Gi"}, "requests": {"cpu": "4"}}},
}


def _by_kind(objs):
    return {o["kind"]: o for o in objs}


# ---------------------------------------------------------------- every object
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", ["r1", "m" * 63])
def test_every_child_validates_against_kubernetes_schema(variant, name):
    for obj in render.render_children(make_model(name, VARIANTS[variant]), CONFIG):
        if obj["kind"] == "ScaledObject":
            continue  # KEDA's CRD is not in kubernetes-validate's schemas
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", ["defaults", "autoscaled", "replicated", "keda"])
@pytest.mark.parametrize("name", ["r1", "m" * 63, "x" * 40 + "-" + "y" * 22])
def test_children_carry_owner_reference_standard_labels_and_short_names(variant, name):
    model = make_model(name, {**VARIANTS.get(variant, {}), **(KEDA if variant == "keda" else {})})
    for obj in render.render_children(model, CONFIG):
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63 and DNS_LABEL.match(meta["name"]), meta["name"]
        assert meta["namespace"] == "models"
        labels = meta["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "deepseek-operator"
        assert labels["app.kubernetes.io/part-of"] == "deepseek-operator"
        assert {"app.kubernetes.io/name", "app.kubernetes.io/component"} <= labels.keys()
        assert all(len(v) <= 63 for v in labels.values())
        if obj["kind"] == "PersistentVolumeClaim":
            assert "ownerReferences" not in meta  # the cache outlives the model
            continue
        assert labels["app.kubernetes.io/instance"] == naming.label_value(name)
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "name": name, "uid": UID,
            "controller": True, "blockOwnerDeletion": True,
        }


def test_rendering_is_pure_and_deterministic():
    model = make_model("r1", AUTOSCALED)
    before = copy.deepcopy(model.model_dump())
    first = render.render_children(model, CONFIG)
    assert render.render_children(model, CONFIG) == first
    assert model.model_dump() == before


def test_model_without_uid_renders_without_owner_reference():
    for obj in render.render_children(make_model(uid=None, spec_patch=AUTOSCALED), CONFIG):
        assert "ownerReferences" not in obj["metadata"]


# ---------------------------------------------------------------- build Job
def test_build_job_runs_the_builder_cli_with_the_engine_fields():
    model = make_model("r1", {"engine.maxBatchSize": 16, "engine.maxSequenceLength": 4096, **SCHEDULED})
    key = cachekey.spec_key(model.spec)
    job = render.render_build_job(model, CONFIG, key)
    assert job["metadata"]["name"] == naming.build_job_name("r1", key)
    assert job["metadata"]["labels"][naming.SPEC_KEY_LABEL] == key
    spec = job["spec"]
    assert spec["backoffLimit"] == 1 and spec["activeDeadlineSeconds"] == 3 * 3600
    assert "ttlSecondsAfterFinished" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (builder,) = pod["containers"]
    assert builder["image"] == "registry.example/builder:1"
    assert builder["command"] == [
        "deepseek-operator", "build",
        "--source", "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "--revision", "abc123",
        "--task", "text-generation", "--backend", "tensorrt", "--precision", "fp16",
        "--max-batch-size", "16", "--max-seq-len", "4096",
        "--gpu-type", "NVIDIA-H100-80GB-HBM3",
        "--cache-dir", "/cache", "--output", "/tmp/repository", "--model-name", "r1",
    ]
    assert builder["resources"] == {"requests": api.BUILDER_RESOURCES["requests"],
                                    "limits": {**api.BUILDER_RESOURCES["limits"], "nvidia.com/gpu": 1}}
    assert {"name": "cache", "mountPath": "/cache"} in builder["volumeMounts"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "deepseek-engine-cache"}} in pod["volumes"]
    assert "envFrom" not in builder


def test_cpu_build_has_no_gpu_and_gpu_type_cpu():
    model = make_model("r1", CPU)
    builder = render.render_build_job(model, CONFIG, "k" * 20)["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in builder["resources"]["limits"]
    cmd = builder["command"]
    assert cmd[cmd.index("--gpu-type") + 1] == "cpu"
    assert cmd[cmd.index("--backend") + 1] == "onnxruntime"


def test_build_job_mounts_credentials_and_pvc_sources_read_only():
    model = make_model("r1", {
        "model.source": "pvc://weights/deepseek/r1",
        "model.credentialsSecret": "hf-token",
        "model.adapter": {"source": "pvc://adapters/lora-1", "revision": "v2"},
    })
    pod = render.render_build_job(model, CONFIG, "k" * 20)["spec"]["template"]["spec"]
    (builder,) = pod["containers"]
    assert builder["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    mounts = {m["mountPath"]: m for m in builder["volumeMounts"]}
    assert mounts["/mnt/pvc/weights"]["readOnly"] is True
    assert mounts["/mnt/pvc/adapters"]["readOnly"] is True
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims["weights"]["readOnly"] is True and claims["adapters"]["readOnly"] is True
    cmd = builder["command"]
    assert cmd[cmd.index("--adapter") + 1] == "pvc://adapters/lora-1"
    assert cmd[cmd.index("--adapter-revision") + 1] == "v2"


def test_build_job_name_changes_with_engine_key_only():
    a = make_model("r1")
    b = make_model("r1", {"engine.precision": "fp8"})
    c = make_model("r1", {"serving.replicas": 5})
    name = lambda m: render.render_build_job(m, CONFIG, cachekey.spec_key(m.spec))["metadata"]["name"]  # noqa: E731
    assert name(a) != name(b)
    assert name(a) == name(c)


# ---------------------------------------------------------------- cache claim
@pytest.mark.parametrize(
    "patch, expected",
    [
        ({}, {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}}}),
        (
            {"cache.size": "2Ti", "cache.storageClassName": "fast", "cache.accessMode": "ReadWriteOnce"},
            {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Ti"}}, "storageClassName": "fast"},
        ),
        ({"cache.size": None}, None),
    ],
)
def test_cache_claim_only_when_a_size_is_given(patch, expected):
    claim = render.render_cache_claim(make_model("r1", patch))
    if expected is None:
        assert claim is None
    else:
        assert claim["spec"] == expected
        assert claim["metadata"]["name"] == "deepseek-engine-cache"


def test_index_entry_is_keyed_by_claim_and_spec_key():
    entry = render.render_index_entry(make_model("r1"), "abc", "r1-build-abc", "2026-01-01T00:00:00Z", 12.5)
    (key, value), = entry.items()
    assert key == "deepseek-engine-cache.abc"
    assert json.loads(value) == {"builtAt": "2026-01-01T00:00:00Z", "buildSeconds": 12.5, "job": "r1-build-abc",
                                 "model": "r1"}
    kubernetes_validate.validate({**render.render_engine_index("models"), "data": entry}, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- Deployment
def test_deployment_serves_triton_on_three_ports_with_health_probes():
    model = make_model("r1")
    dep = render.render_deployment(model, CONFIG, "key123")
    pod = dep["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["image"] == api.DEFAULT_TRITON_IMAGE
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # Text generation: whether the model's processes answer (Triton keeps a model whose process died ready).
    assert triton["livenessProbe"]["exec"]["command"] == [
        "python3", "-m", "deepseek_model_repository.probe", "--port=8000", naming.triton_model_name("r1")]
    assert triton["livenessProbe"]["timeoutSeconds"] > 5 and "httpGet" not in triton["livenessProbe"]
    # tritonserver under the watch that ends it when Triton lost a model's process as it initialized.
    assert triton["command"][:5] == ["python3", "-m", "deepseek_model_repository.supervise", "--", "tritonserver"]
    assert "--model-repository=/models" in triton["command"]
    assert triton["resources"] == {"requests": api.TRITON_RESOURCES["requests"],
                                   "limits": {**api.TRITON_RESOURCES["limits"], "nvidia.com/gpu": 1}}
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["metadata"]["annotations"] == {naming.ENGINE_KEY_ANNOTATION: "key123"}
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["cache"]["persistentVolumeClaim"]["readOnly"] is True
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]


def test_deployment_init_container_writes_the_repository_for_the_engine_key():
    model = make_model("r1", {"serving.dynamicBatching": {"maxQueueDelayMicroseconds": 250,
                                                           "preferredBatchSizes": [4, 8]}})
    (init,) = render.render_deployment(model, CONFIG, "key123")["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == "registry.example/operator:1"
    assert init["command"] == [
        "deepseek-operator", "repository", "--engine-ref", "/cache/refs/key123.json", "--output", "/models",
        "--model-name", "r1", "--max-queue-delay-us", "250", "--preferred-batch-size", "4",
        "--preferred-batch-size", "8", "--gpus", "1",
    ]


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_a_model_without_text_generation_keeps_tritons_own_liveness(task):
    (triton,) = render.render_deployment(make_model("r1", {"model.task": task}), CONFIG, "k")["spec"]["template"][
        "spec"]["containers"]
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert "exec" not in triton["livenessProbe"]


@pytest.mark.parametrize(("task", "patch", "delay"), [
    ("text-generation", {}, "0"),  # its scheduler batches by itself: a delay only adds to the first token's time
    ("text-classification", {}, "1000"),
    ("feature-extraction", {}, "1000"),
    ("text-generation", {"serving.dynamicBatching": {"maxQueueDelayMicroseconds": 1000}}, "1000"),
    ("text-classification", {"serving.dynamicBatching": {"maxQueueDelayMicroseconds": 0}}, "0"),
])
def test_the_queue_delay_the_init_container_writes_is_the_crs_else_its_tasks_default(task, patch, delay):
    from deepseek_local import local

    model = make_model("r1", {"model.task": task, **patch})
    command = render.render_deployment(model, CONFIG, "key123")["spec"]["template"]["spec"]["initContainers"][0][
        "command"]
    assert command[command.index("--max-queue-delay-us") + 1] == delay
    assert str(local.repository_options(model)["max_queue_delay_us"]) == delay


def test_a_stream_interval_reaches_the_repository_and_the_default_writes_no_flag():
    """The default leaves the pod template as it was (no rollout on upgrade); another value rolls it."""
    def command(patch):
        deployment = render.render_deployment(make_model("r1", patch), CONFIG, "key123")
        return deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]

    assert "--stream-interval" not in command({})
    assert "--stream-interval" not in command({"serving.streamInterval": 1})
    got = command({"serving.streamInterval": 4})
    assert got[got.index("--stream-interval") + 1] == "4"


def test_engine_threads_reach_the_repository_and_the_default_writes_no_flag():
    def command(patch):
        deployment = render.render_deployment(make_model("r1", {**CPU, **patch}), CONFIG, "key123")
        return deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]

    assert "--engine-threads" not in command({})
    assert "--engine-threads" not in command({"serving.engineThreads": 0})
    got = command({"serving.engineThreads": 6})
    assert got[got.index("--engine-threads") + 1] == "6"


def test_a_stopping_replica_leaves_the_service_then_drains_for_drain_seconds_within_its_grace_period():
    def pod(patch):
        return render.render_deployment(make_model("r1", patch), CONFIG, "key123")["spec"]["template"]["spec"]

    for patch, drain in (({}, 30), ({"serving.drainSeconds": 600}, 600), ({"serving.drainSeconds": 0}, 0)):
        spec = pod(patch)
        (triton,) = spec["containers"]
        assert triton["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(render.PRESTOP_SECONDS)]}}
        assert f"--exit-timeout-secs={drain}" in triton["command"]
        assert spec["terminationGracePeriodSeconds"] == render.PRESTOP_SECONDS + drain + render.EXIT_MARGIN_SECONDS


def test_a_prefill_chunk_reaches_the_repository_and_the_default_writes_no_flag():
    def command(patch):
        deployment = render.render_deployment(make_model("r1", patch), CONFIG, "key123")
        return deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]

    assert "--prefill-chunk-tokens" not in command({})  # the Deployments of CRs without it keep their pod template
    assert "--no-prefix-sharing" not in command({}) and "--no-prefix-sharing" in command({"serving.prefixSharing": False})
    got = command({"serving.prefillChunkTokens": 256})
    assert got[got.index("--prefill-chunk-tokens") + 1] == "256"


def test_a_request_timeout_reaches_the_repository_and_the_default_writes_no_flag():
    def command(patch):
        deployment = render.render_deployment(make_model("r1", patch), CONFIG, "key123")
        return deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]

    assert "--request-timeout-seconds" not in command({})
    got = command({"serving.requestTimeoutSeconds": 120})
    assert got[got.index("--request-timeout-seconds") + 1] == "120"
    got = command({"serving.requestTimeoutSeconds": 0.25})
    assert got[got.index("--request-timeout-seconds") + 1] == "0.25"


def test_the_local_mode_writes_the_repository_the_init_container_writes():
    from deepseek_local import local

    model = make_model("r1", {"serving.dynamicBatching": {"maxQueueDelayMicroseconds": 250,
                                                           "preferredBatchSizes": [4, 8]},
                              "serving.streamInterval": 4, "serving.engineThreads": 3,
                              "serving.requestTimeoutSeconds": 90, "serving.prefillChunkTokens": 512,
                              "serving.prefixSharing": False, **CPU})
    command = render.repository_command(model, "key123")
    options = local.repository_options(model)

    def flag(name):
        return [command[i + 1] for i, arg in enumerate(command) if arg == name]

    assert flag("--max-queue-delay-us") == [str(options["max_queue_delay_us"])] == ["250"]
    assert flag("--preferred-batch-size") == [str(s) for s in options["preferred_batch_sizes"]] == ["4", "8"]
    assert flag("--stream-interval") == [str(options["stream_interval"])] == ["4"]
    assert flag("--engine-threads") == [str(options["engine_threads"])] == ["3"]
    assert [float(v) for v in flag("--request-timeout-seconds")] == [options["request_timeout_s"]] == [90]
    assert flag("--prefill-chunk-tokens") == [str(options["prefill_chunk_tokens"])] == ["512"]
    assert "--no-prefix-sharing" in command and options["share_prefixes"] is False


@pytest.mark.parametrize("patch", [{}, CPU, AUTOSCALED])
def test_deployment_pods_are_restricted(patch):
    pod = render.render_deployment(make_model("r1", patch), CONFIG, "k")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx.get("privileged") is not True


@pytest.mark.parametrize(
    "patch, gpus, other",
    [
        ({}, 1, {}),
        ({"serving.gpusPerReplica": 4}, 4, {}),
        (CPU, None, {}),
        # The CR's keys win; the others keep their defaults; a default request follows a lowered limit down.
        ({**CPU, "serving.resources": {"limits": {"memory": "2Gi"}, "requests": {"cpu": "2"}}}, None,
         {"limits": {"cpu": "8", "memory": "2Gi"}, "requests": {"cpu": "2", "memory": "2Gi"}}),
    ],
)
def test_deployment_gpu_limits_only_when_gpus_per_replica_positive(patch, gpus, other):
    (triton,) = render.render_deployment(make_model("r1", patch), CONFIG, "k")["spec"]["template"]["spec"]["containers"]
    resources = triton.get("resources", {})
    assert resources.get("limits", {}).get("nvidia.com/gpu") == gpus
    if other:
        limits = {k: v for k, v in resources["limits"].items() if k != "nvidia.com/gpu"}
        assert limits == other["limits"] and resources["requests"] == other["requests"]


@pytest.mark.parametrize("patch", [AUTOSCALED, KEDA])
def test_hpa_present_means_deployment_has_no_replicas(patch):
    model = make_model("r1", patch)
    objs = render.render_serving(model, CONFIG, "k")
    kinds = _by_kind(objs)
    assert {"HorizontalPodAutoscaler", "ScaledObject"} & kinds.keys()
    assert "replicas" not in kinds["Deployment"]["spec"]
    target = (kinds.get("HorizontalPodAutoscaler") or kinds["ScaledObject"])["spec"]["scaleTargetRef"]
    assert target["name"] == kinds["Deployment"]["metadata"]["name"]


def test_deployment_replicas_follow_spec_without_autoscaler():
    objs = render.render_serving(make_model("r1", {"serving.replicas": 3}), CONFIG, "k")
    assert _by_kind(objs)["Deployment"]["spec"]["replicas"] == 3
    assert "HorizontalPodAutoscaler" not in _by_kind(objs)


# ---------------------------------------------------------------- Service, PDB, endpoints
def test_service_exposes_the_three_ports_and_selects_triton_pods():
    model = make_model("r1")
    svc = render.render_service(model)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    assert svc["spec"]["selector"] == naming.selector_labels("r1", "triton")
    assert render.endpoints(model) == {
        "http": "http://r1-triton.models.svc:8000",
        "grpc": "r1-triton.models.svc:8001",
        "metrics": "http://r1-triton.models.svc:8002/metrics",
    }


@pytest.mark.parametrize(
    "patch, wanted",
    [
        ({}, False),
        ({"serving.replicas": 2}, True),
        ({"autoscaling.enabled": True, "autoscaling.maxReplicas": 1}, False),
        (AUTOSCALED, True),
    ],
)
def test_pdb_only_when_more_than_one_replica_serves(patch, wanted):
    pdb = render.render_pdb(make_model("r1", patch))
    assert (pdb is not None) == wanted
    if pdb:
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": naming.selector_labels("r1", "triton")}}


def test_render_children_from_an_empty_cache():
    kinds = [o["kind"] for o in render.render_children(make_model("r1", {"serving.replicas": 2}), CONFIG)]
    assert kinds == ["PersistentVolumeClaim", "Job", "Deployment", "Service", "PodDisruptionBudget"]


# ---------------------------------------------------------------- config
def test_config_from_env_reads_the_chart_variables():
    cfg = OperatorConfig.from_env({"DEEPSEEK_BUILDER_IMAGE": "b:1", "DEEPSEEK_OPERATOR_IMAGE": "o:1",
                                   "WATCH_NAMESPACES": "a, b,,"})
    assert (cfg.builder_image, cfg.operator_image, cfg.watch_namespaces) == ("b:1", "o:1", ("a", "b"))
    assert OperatorConfig.from_env({}).watch_namespaces == ()
