"""The real operator against an emulated API: create -> build -> deploy -> Ready, and a failed build."""

from __future__ import annotations

import asyncio

import pytest

from deepseek_operator import naming
from kube_harness import NAMESPACE, SPEC, condition, key_of

pytestmark = [pytest.mark.timeout(60)]


async def test_model_goes_from_pending_to_ready_through_a_build(cluster, start_operator):
    await start_operator()
    assert cluster.watched_namespaces() == {NAMESPACE}  # as `run --namespace models` watches
    created = await cluster.create_model("r1", SPEC)
    key = key_of(SPEC)
    job_name = naming.build_job_name("r1", key)

    obj = await cluster.wait_phase("r1", "Building")
    assert condition(obj, "EngineBuilt")["reason"] == "BuildRunning"
    assert condition(obj, "Ready")["status"] == "False"
    job = await cluster.get("Job", job_name)
    assert job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/builder:test"
    claim = await cluster.get("PersistentVolumeClaim", "deepseek-engine-cache")
    assert claim is not None and "ownerReferences" not in claim["metadata"]
    assert await cluster.get("Deployment", naming.triton_name("r1")) is None  # nothing to serve yet

    await cluster.finish_job(job_name, succeeded=True)
    obj = await cluster.wait_phase("r1", "Deploying")
    assert condition(obj, "EngineBuilt")["reason"] == "BuildSucceeded"
    assert obj["status"]["engine"]["cacheKey"] == key
    assert obj["status"]["engine"]["reused"] is False
    assert obj["status"]["engine"]["builtAt"]
    index = await cluster.get("ConfigMap", "deepseek-engine-index")
    assert f"deepseek-engine-cache.{key}" in index["data"]
    assert "ownerReferences" not in index["metadata"]

    triton = naming.triton_name("r1")
    dep = await cluster.get("Deployment", triton)
    assert dep["spec"]["template"]["metadata"]["annotations"][naming.ENGINE_KEY_ANNOTATION] == key
    assert dep["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert (await cluster.get("Service", triton)) is not None

    await cluster.make_available(triton)
    obj = await cluster.wait_phase("r1", "Ready")
    status = obj["status"]
    assert [c["type"] for c in status["conditions"]] == ["EngineBuilt", "Serving", "Ready"]
    assert all(c["status"] == "True" for c in status["conditions"])
    assert condition(obj, "Ready")["reason"] == "ModelReady"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["endpoints"] == {
        "http": f"http://{triton}.{NAMESPACE}.svc:8000",
        "grpc": f"{triton}.{NAMESPACE}.svc:8001",
        "metrics": f"http://{triton}.{NAMESPACE}.svc:8002/metrics",
    }
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)
    assert len(await cluster.list("Job")) == 1

    events = [e for e in await cluster.list("Event") if e["involvedObject"].get("name") == "r1"]
    reasons = {e["reason"] for e in events}
    assert {"BuildRunning", "BuildSucceeded", "ModelReady"} <= reasons


async def test_failed_build_is_reported_and_not_retried(cluster, start_operator):
    await start_operator()
    await cluster.create_model("r2", SPEC)
    job_name = naming.build_job_name("r2", key_of(SPEC))
    await cluster.wait_phase("r2", "Building")

    await cluster.finish_job(job_name, succeeded=False, reason="BackoffLimitExceeded")
    obj = await cluster.wait_phase("r2", "Failed")
    built = condition(obj, "EngineBuilt")
    assert (built["status"], built["reason"]) == ("False", "BackoffLimitExceeded")
    assert job_name in built["message"] and "kubectl logs" in built["message"]
    assert condition(obj, "Ready")["reason"] == "BuildFailed"
    assert await cluster.get("Deployment", naming.triton_name("r2")) is None

    events = [e for e in await cluster.list("Event") if e["involvedObject"].get("name") == "r2"]
    assert any(e["type"] == "Warning" and e["reason"] == "BackoffLimitExceeded" for e in events)
    # Reconciles go on (the Job was annotated, events came); the failed Job stays the only Job for this key.
    await asyncio.sleep(3)
    jobs = await cluster.list("Job")
    assert [j["metadata"]["name"] for j in jobs] == [job_name]
    job = await cluster.get("Job", job_name)
    assert job["metadata"]["annotations"]["deepseek.ai/build-outcome"] == "failed"

    # Changing an engine field gives a new key, so the operator may try again.
    fixed = {**SPEC, "engine": {**SPEC["engine"], "precision": "fp16"}}
    await cluster.patch_spec("r2", {"engine": {"precision": "fp16"}})
    await cluster.wait_phase("r2", "Building")
    assert sorted(j["metadata"]["name"] for j in await cluster.list("Job")) == sorted(
        [job_name, naming.build_job_name("r2", key_of(fixed))])
