"""Every pod the operator renders is hardened: read-only root, no service-account token, requests and limits."""

from __future__ import annotations

import pytest

from deepseek_operator import api, render
from deepseek_operator.config import OperatorConfig

from test_render import AUTOSCALED, CPU, KEDA, SCHEDULED, make_model

CONFIG = OperatorConfig(builder_image="registry.example/builder:1", operator_image="registry.example/operator:1")
VARIANTS = [{}, CPU, SCHEDULED, AUTOSCALED, KEDA,
            {**CPU, "model.source": "pvc://weights/r1", "model.adapter": {"source": "pvc://loras/a"}},
            {**CPU, "model.credentialsSecret": "hf-token"}]


def pods(patch: dict):
    for obj in render.render_children(make_model("r1", patch), CONFIG):
        template = (obj.get("spec") or {}).get("template")
        if template:
            yield obj["kind"], template["spec"]


@pytest.mark.parametrize("patch", VARIANTS)
def test_every_rendered_pod_is_hardened(patch):
    kinds = []
    for kind, pod in pods(patch):
        kinds.append(kind)
        assert pod["automountServiceAccountToken"] is False, kind
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{kind}/{container['name']}"
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, where
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][section].keys(), where
            for name, request in container["resources"]["requests"].items():
                limit = container["resources"]["limits"][name]
                assert render.quantity_value(request) <= render.quantity_value(limit), where
            # Every path it writes is a declared volume: HOME and caches live on the /tmp emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"].startswith("/tmp/"), where
            assert all(m in volumes for m in mounts.values()), where
    assert sorted(kinds) == ["Deployment", "Job"]


def test_resources_are_set_from_the_cr():
    model = make_model("r1", {**CPU, "engine.builderResources": {"limits": {"memory": "200Gi"}},
                              "serving.initResources": {"requests": {"cpu": "250m"}}})
    job = render.render_build_job(model, CONFIG, "k" * 20)
    builder = job["spec"]["template"]["spec"]["containers"][0]
    assert builder["resources"]["limits"] == {**api.BUILDER_RESOURCES["limits"], "memory": "200Gi"}
    dep = render.render_deployment(model, CONFIG, "k")
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["resources"]["requests"] == {**api.REPOSITORY_RESOURCES["requests"], "cpu": "250m"}


def test_the_documented_defaults_are_the_rendered_ones():
    fields = {
        "resources": (api.ServingSpec, api.TRITON_RESOURCES),
        "init_resources": (api.ServingSpec, api.REPOSITORY_RESOURCES),
        "builder_resources": (api.EngineSpec, api.BUILDER_RESOURCES),
    }
    for name, (model, defaults) in fields.items():
        description = model.model_fields[name].description
        for values in defaults.values():
            assert all(f"{k} {v}" in description for k, v in values.items()), name


def test_credentials_never_reach_the_build_jobs_command():
    model = make_model("r1", CPU)
    leaky = model.model_copy(update={"spec": model.spec.model_copy(update={
        "model": model.spec.model.model_copy(update={"source": "s3://AKIAKEY:SECRETVALUE@bucket/r1"})})})
    with pytest.raises(api.SpecError) as err:
        render.render_build_job(leaky, CONFIG, "k" * 20)
    assert "credentialsSecret" in str(err.value) and "SECRETVALUE" not in str(err.value)
    secret = make_model("r1", {**CPU, "model.credentialsSecret": "s3-creds"})
    builder = render.render_build_job(secret, CONFIG, "k" * 20)["spec"]["template"]["spec"]["containers"][0]
    assert builder["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
