"""Engine and serving updates, cache hits, deletion and restarts, with the real operator against an emulated API."""

from __future__ import annotations

import asyncio

import kmock
import pytest

from deepseek_operator import metrics, naming
from kube_harness import SPEC, condition, key_of

pytestmark = [pytest.mark.timeout(90)]


def merged(base: dict, section: str, **fields) -> dict:
    return {**base, section: {**base.get(section, {}), **fields}}


def deployed_key(dep: dict) -> str:
    return dep["spec"]["template"]["metadata"]["annotations"][naming.ENGINE_KEY_ANNOTATION]


async def jobs(cluster) -> list[str]:
    return sorted(j["metadata"]["name"] for j in await cluster.list("Job"))


async def bring_to_ready(cluster, name: str, spec: dict) -> dict:
    """Create a model and play the Job and Deployment controllers until it is Ready."""
    await cluster.create_model(name, spec)
    await cluster.wait_phase(name, "Building")
    await cluster.finish_job(naming.build_job_name(name, key_of(spec)), succeeded=True)
    await cluster.wait_phase(name, "Deploying")
    await cluster.make_available(naming.triton_name(name))
    return await cluster.wait_phase(name, "Ready")


async def test_engine_change_rebuilds_while_the_old_engine_serves_then_rolls(cluster, start_operator):
    await start_operator()
    old_key = key_of(SPEC)
    await bring_to_ready(cluster, "r1", SPEC)
    triton = naming.triton_name("r1")

    new_spec = merged(SPEC, "engine", maxBatchSize=8)
    new_key = key_of(new_spec)
    assert new_key != old_key
    await cluster.patch_spec("r1", {"engine": {"maxBatchSize": 8}})

    obj = await cluster.wait_phase("r1", "Building")
    assert await jobs(cluster) == sorted([naming.build_job_name("r1", old_key), naming.build_job_name("r1", new_key)])
    built = condition(obj, "EngineBuilt")
    assert built["reason"] == "BuildRunning" and old_key in built["message"] and new_key in built["message"]
    assert condition(obj, "Serving")["status"] == "True"
    assert condition(obj, "Ready")["reason"] == "EngineRebuilding"
    assert obj["status"]["engine"]["cacheKey"] == old_key
    assert deployed_key(await cluster.get("Deployment", triton)) == old_key

    await cluster.finish_job(naming.build_job_name("r1", new_key), succeeded=True)
    obj = await cluster.wait_model("r1", lambda o: condition(o, "Ready").get("reason") == "RollingOut",
                                   what="Ready=False RollingOut")
    assert obj["status"]["phase"] == "Deploying"
    assert obj["status"]["engine"]["cacheKey"] == new_key
    dep = await cluster.get("Deployment", triton)
    assert deployed_key(dep) == new_key
    assert f"/cache/refs/{new_key}.json" in dep["spec"]["template"]["spec"]["initContainers"][0]["command"]

    await cluster.make_available(triton)
    obj = await cluster.wait_phase("r1", "Ready")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 2


async def test_serving_and_autoscaling_changes_never_rebuild(cluster, start_operator):
    # As with the chart's KEDA support off: the operator may not read ScaledObjects, and must not need to.
    cluster.server[kmock.resource("keda.sh", "v1alpha1", "scaledobjects")] << 403
    await start_operator()
    await bring_to_ready(cluster, "r1", SPEC)
    triton = naming.triton_name("r1")
    before = await jobs(cluster)

    await cluster.patch_spec("r1", {"serving": {"replicas": 3, "dynamicBatching": {"maxQueueDelayMicroseconds": 50}}})
    obj = await cluster.wait_model("r1", lambda o: condition(o, "Ready").get("reason") == "RollingOut",
                                   what="rolling out the serving change")
    dep = await cluster.get("Deployment", triton)
    assert dep["spec"]["replicas"] == 3
    assert "50" in dep["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert deployed_key(dep) == key_of(SPEC)
    pdb = await cluster.get("PodDisruptionBudget", triton)
    assert pdb["spec"]["maxUnavailable"] == 1
    await cluster.make_available(triton)
    await cluster.wait_phase("r1", "Ready")

    await cluster.patch_spec("r1", {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}})
    hpa = await cluster.wait_for(lambda: cluster.get("HorizontalPodAutoscaler", triton), what="the HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == triton
    # The HPA owns the count now: the operator neither sets nor drops it (dropping would reset it to 1).
    assert (await cluster.get("Deployment", triton))["spec"]["replicas"] == 3
    assert hpa["metadata"]["ownerReferences"][0]["kind"] == "DeepSeekModel"
    await cluster.call(cluster.kube.patch, "HorizontalPodAutoscaler", "models", triton,
                       {"status": {"currentReplicas": 3, "desiredReplicas": 4}}, "status")
    obj = await cluster.wait_model("r1", lambda o: (o["status"].get("autoscaling") or {}).get("desiredReplicas") == 4,
                                   what="autoscaling status")
    assert obj["status"]["autoscaling"] == {"currentReplicas": 3, "desiredReplicas": 4}

    await cluster.patch_spec("r1", {"autoscaling": {"enabled": False}})
    await cluster.wait_for(lambda: _absent(cluster, "HorizontalPodAutoscaler", triton), what="HPA removed")
    await cluster.wait_model("r1", lambda o: "autoscaling" not in o["status"], what="autoscaling status dropped")
    assert await jobs(cluster) == before  # no rebuild for any of it


async def _absent(cluster, kind, name):
    return await cluster.get(kind, name) is None


async def test_same_engine_fields_reuse_the_cached_engine_without_a_job(cluster, start_operator):
    await start_operator()
    await bring_to_ready(cluster, "first", SPEC)
    other = merged(SPEC, "serving", replicas=2)

    await cluster.create_model("second", other)
    obj = await cluster.wait_phase("second", "Deploying")
    built = condition(obj, "EngineBuilt")
    assert (built["status"], built["reason"]) == ("True", "EngineReused")
    assert obj["status"]["engine"]["reused"] is True
    assert obj["status"]["engine"]["cacheKey"] == key_of(SPEC)
    assert await jobs(cluster) == [naming.build_job_name("first", key_of(SPEC))]
    dep = await cluster.get("Deployment", naming.triton_name("second"))
    assert deployed_key(dep) == key_of(SPEC)


async def test_deleting_the_model_removes_children_but_keeps_the_cache(cluster, start_operator):
    await start_operator()
    obj = await bring_to_ready(cluster, "r1", merged(SPEC, "serving", replicas=2))
    uid = obj["metadata"]["uid"]
    triton = naming.triton_name("r1")
    children = [("Deployment", triton), ("Service", triton), ("PodDisruptionBudget", triton),
                ("Job", naming.build_job_name("r1", key_of(SPEC)))]
    for kind, name in children:
        child = await cluster.get(kind, name)
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid, kind

    await cluster.delete("DeepSeekModel", "r1")
    await cluster.wait_for(lambda: _absent(cluster, "DeepSeekModel", "r1"), what="the model to go")
    for kind, name in children:
        assert await cluster.get(kind, name) is None, kind
    assert await cluster.get("PersistentVolumeClaim", "deepseek-engine-cache") is not None
    index = await cluster.get("ConfigMap", "deepseek-engine-index")
    assert f"deepseek-engine-cache.{key_of(SPEC)}" in index["data"]

    # A model created later with the same engine fields finds the engine the deleted one built.
    await cluster.create_model("r1-again", SPEC)
    obj = await cluster.wait_phase("r1-again", "Deploying")
    assert condition(obj, "EngineBuilt")["reason"] == "EngineReused"


async def test_restart_mid_build_resumes_without_a_second_job(cluster, start_operator):
    first = await start_operator()
    await cluster.create_model("r1", SPEC)
    await cluster.wait_phase("r1", "Building")
    job = naming.build_job_name("r1", key_of(SPEC))
    assert await jobs(cluster) == [job]
    started = metrics.REGISTRY.get_sample_value("deepseek_operator_builds_started_total")

    await asyncio.to_thread(first.stop)
    await cluster.finish_job(job, succeeded=True)  # the build finishes while no operator runs

    await start_operator()
    await cluster.wait_phase("r1", "Deploying")
    assert await jobs(cluster) == [job]
    assert metrics.REGISTRY.get_sample_value("deepseek_operator_builds_started_total") == started
    await cluster.make_available(naming.triton_name("r1"))
    await cluster.wait_phase("r1", "Ready")


async def test_restart_while_the_job_runs_keeps_waiting_for_it(cluster, start_operator):
    first = await start_operator()
    await cluster.create_model("r1", SPEC)
    await cluster.wait_phase("r1", "Building")
    await asyncio.to_thread(first.stop)

    await start_operator()
    await asyncio.sleep(2.5)  # the resume handler has run
    job = naming.build_job_name("r1", key_of(SPEC))
    assert await jobs(cluster) == [job]
    assert (await cluster.get("DeepSeekModel", "r1"))["status"]["phase"] == "Building"
    await cluster.finish_job(job, succeeded=True)
    await cluster.wait_phase("r1", "Deploying")


@pytest.mark.parametrize("patch, field", [
    ({"serving": {"gpusPerReplica": 0, "dynamicBatching": {"preferredBatchSizes": [64]}}}, "preferredBatchSizes"),
    ({"autoscaling": {"enabled": True, "metricsBackend": "keda"}}, "spec.autoscaling.prometheusAddress"),
])
async def test_invalid_spec_is_reported_with_the_field(cluster, start_operator, patch, field):
    await start_operator()
    await cluster.create_model("bad", {**SPEC, **patch})
    obj = await cluster.wait_phase("bad", "Failed")
    ready = condition(obj, "Ready")
    assert ready["reason"] == "InvalidSpec" and field in ready["message"]
    assert condition(obj, "EngineBuilt")["reason"] == "InvalidSpec"
    assert await jobs(cluster) == []


async def test_missing_cache_claim_keeps_the_model_pending(cluster, start_operator):
    await start_operator()
    await cluster.create_model("r1", {**SPEC, "cache": {"claimName": "engines", "size": None}})
    obj = await cluster.wait_phase("r1", "Pending")
    assert condition(obj, "EngineBuilt")["reason"] == "CacheClaimMissing"
    assert "engines" in condition(obj, "EngineBuilt")["message"]
    assert await jobs(cluster) == []


async def test_keda_backend_without_keda_installed_says_what_to_do(cluster, start_operator):
    # A cluster without KEDA answers 404 for its API (kmock would otherwise store any resource).
    cluster.server[kmock.resource("keda.sh", "v1alpha1", "scaledobjects")] << 404
    await start_operator()
    spec = {**SPEC, "autoscaling": {"enabled": True, "metricsBackend": "keda",
                                    "prometheusAddress": "http://prometheus.monitoring:9090"}}
    await bring_to_deploying(cluster, "r1", spec)
    await cluster.make_available(naming.triton_name("r1"))
    obj = await cluster.wait_model("r1", lambda o: condition(o, "Ready").get("reason") == "AutoscalerUnavailable",
                                   what="Ready=False AutoscalerUnavailable")
    assert "install KEDA" in condition(obj, "Ready")["message"]
    assert condition(obj, "Serving")["status"] == "True"
    assert "replicas" not in (await cluster.get("Deployment", naming.triton_name("r1")))["spec"]


async def bring_to_deploying(cluster, name: str, spec: dict) -> dict:
    await cluster.create_model(name, spec)
    await cluster.wait_phase(name, "Building")
    await cluster.finish_job(naming.build_job_name(name, key_of(spec)), succeeded=True)
    return await cluster.wait_phase(name, "Deploying")


async def test_a_dropped_serving_field_is_removed_from_the_deployment(cluster, start_operator):
    await start_operator()
    spec = merged(SPEC, "serving", nodeSelector={"pool": "inference"},
                  tolerations=[{"key": "dedicated", "operator": "Exists"}])
    await bring_to_ready(cluster, "r1", spec)
    triton = naming.triton_name("r1")
    pod = (await cluster.get("Deployment", triton))["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "inference"} and pod["tolerations"]

    await cluster.patch_spec("r1", {"serving": {"nodeSelector": None, "tolerations": None}})

    async def dropped():
        pod = (await cluster.get("Deployment", triton))["spec"]["template"]["spec"]
        return "nodeSelector" not in pod and "tolerations" not in pod

    await cluster.wait_for(dropped, what="nodeSelector and tolerations removed")
    assert await jobs(cluster) == [naming.build_job_name("r1", key_of(SPEC))]
