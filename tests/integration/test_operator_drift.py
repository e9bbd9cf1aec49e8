"""Hand edits and deletions of a model's children are repaired by the next reconcile; an HPA's count is left alone."""

from __future__ import annotations

import copy

import pytest

from deepseek_operator import naming
from kube_harness import SPEC, key_of

pytestmark = [pytest.mark.timeout(90)]

AUTOSCALED = {**SPEC, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}}


async def ready_model(cluster, name: str, spec: dict) -> None:
    await cluster.create_model(name, spec)
    await cluster.wait_phase(name, "Building")
    await cluster.finish_job(naming.build_job_name(name, key_of(spec)), succeeded=True)
    await cluster.wait_phase(name, "Deploying")
    await cluster.make_available(naming.triton_name(name))
    await cluster.wait_phase(name, "Ready")


def triton_container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def edited_containers(dep: dict, change) -> dict:
    containers = copy.deepcopy(dep["spec"]["template"]["spec"]["containers"])
    change(containers[0])
    return {"spec": {"template": {"spec": {"containers": containers}}}}


def set_image(c):
    c["image"] = "evil.example/triton:hacked"


def set_args(c):
    c["command"] = ["tritonserver", "--model-repository=/elsewhere"]


def set_env(c):
    # A value the operator sets (a real API server merges env by name, so it too puts this one back).
    c["env"] = [{**e, "value": "/root"} if e["name"] == "HOME" else e for e in c["env"]]


def set_resources(c):
    c["resources"] = {"limits": {"cpu": "64"}}


@pytest.mark.parametrize("what, change", [("image", set_image), ("args", set_args), ("env", set_env),
                                          ("resources", set_resources)])
async def test_a_hand_edited_triton_container_is_restored(cluster, start_operator, what, change):
    await start_operator()
    await ready_model(cluster, "r1", AUTOSCALED)
    triton = naming.triton_name("r1")
    rendered = triton_container(await cluster.get("Deployment", triton))

    await cluster.edit("Deployment", triton, edited_containers(await cluster.get("Deployment", triton), change))

    async def restored():
        return triton_container(await cluster.get("Deployment", triton)) == rendered

    await cluster.wait_for(restored, timeout=10, what=f"the Deployment's {what} to be restored")


async def test_selector_labels_and_autoscaler_edits_are_restored_and_the_hpa_count_is_kept(cluster, start_operator):
    await start_operator()
    await ready_model(cluster, "r1", AUTOSCALED)
    triton = naming.triton_name("r1")
    selector = naming.selector_labels("r1", "triton")
    before = {kind: await cluster.get(kind, triton)
              for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler")}

    # The HPA scales the Deployment: its count is its own, and the operator's applies leave it.
    await cluster.edit("Deployment", triton, {"spec": {"replicas": 3}}, manager="kube-controller-manager")
    await cluster.edit("Service", triton, {"spec": {"selector": {"app.kubernetes.io/instance": "someone-else"}}})
    await cluster.edit("PodDisruptionBudget", triton, {"spec": {"maxUnavailable": 3}})
    await cluster.edit("HorizontalPodAutoscaler", triton, {"spec": {"maxReplicas": 99}})
    await cluster.edit("Deployment", triton,
                       {"spec": {"template": {"metadata": {"labels": {"app.kubernetes.io/part-of": "x"}}}}})

    async def restored():
        svc = await cluster.get("Service", triton)
        pdb = await cluster.get("PodDisruptionBudget", triton)
        hpa = await cluster.get("HorizontalPodAutoscaler", triton)
        dep = await cluster.get("Deployment", triton)
        return (svc["spec"]["selector"] == selector and pdb["spec"] == before["PodDisruptionBudget"]["spec"]
                and hpa["spec"]["maxReplicas"] == 3
                and dep["spec"]["template"]["metadata"]["labels"] == before["Deployment"]["spec"]["template"][
                    "metadata"]["labels"])

    await cluster.wait_for(restored, timeout=10, what="selector, PDB, HPA and pod labels restored")
    dep = await cluster.get("Deployment", triton)
    assert dep["spec"]["replicas"] == 3  # the HPA's, untouched
    assert triton_container(dep) == triton_container(before["Deployment"])


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"])
async def test_a_deleted_child_comes_back(cluster, start_operator, kind):
    await start_operator()
    await ready_model(cluster, "r1", AUTOSCALED)
    triton = naming.triton_name("r1")
    before = await cluster.get(kind, triton)
    await cluster.delete(kind, triton)

    async def back():
        obj = await cluster.get(kind, triton)
        return obj is not None and obj["spec"] == {**before["spec"], **({"replicas": obj["spec"]["replicas"]}
                                                                         if "replicas" in obj["spec"] else {})}

    await cluster.wait_for(back, timeout=10, what=f"the {kind} to be recreated")


async def test_a_deleted_build_job_is_recreated_while_the_engine_is_missing(cluster, start_operator):
    await start_operator()
    await cluster.create_model("r1", SPEC)
    await cluster.wait_phase("r1", "Building")
    job = naming.build_job_name("r1", key_of(SPEC))
    await cluster.delete("Job", job)

    async def recreated():
        return await cluster.get("Job", job)

    await cluster.wait_for(recreated, timeout=10, what="the build Job to be recreated")
    assert [j["metadata"]["name"] for j in await cluster.list("Job")] == [job]
    assert (await cluster.get("PersistentVolumeClaim", "deepseek-engine-cache")) is not None
