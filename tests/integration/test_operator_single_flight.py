"""One build per engine key and cache, even when identical models arrive together (the claim is a Lease)."""

from __future__ import annotations

import asyncio

import pytest

from deepseek_operator import naming
from kube_harness import SPEC, condition, key_of

pytestmark = [pytest.mark.timeout(120)]

KEY = key_of(SPEC)


async def job_names(cluster) -> list[str]:
    return sorted(j["metadata"]["name"] for j in await cluster.list("Job"))


async def create_together(cluster, names: list[str], spec: dict = SPEC) -> None:
    await asyncio.gather(*(cluster.create_model(n, spec) for n in names))


async def wait_all(cluster, names, check, what):
    await asyncio.gather(*(cluster.wait_model(n, check, timeout=30, what=what) for n in names))


def built_reason(obj) -> str:
    return condition(obj, "EngineBuilt").get("reason", "")


async def test_twenty_identical_models_build_once_and_all_serve(cluster, start_operator):
    await start_operator()
    names = [f"m{i:02d}" for i in range(20)]
    other = {**SPEC, "engine": {**SPEC["engine"], "precision": "fp16"}}
    await create_together(cluster, names)
    await cluster.create_model("other", other)  # other engine inputs still build in parallel

    await wait_all(cluster, names, lambda o: built_reason(o) in ("BuildRunning", "WaitingForBuild"), "a build")
    await cluster.wait_model("other", lambda o: built_reason(o) == "BuildRunning", what="its own build")
    jobs = await job_names(cluster)
    assert len(jobs) == 2, jobs
    (job,) = [j for j in jobs if j != naming.build_job_name("other", key_of(other))]
    builder = job.split("-build-")[0]
    for name in names:
        obj = await cluster.get("DeepSeekModel", name)
        built = condition(obj, "EngineBuilt")
        if name == builder:
            assert built["reason"] == "BuildRunning"
        else:
            assert (built["status"], built["reason"]) == ("False", "WaitingForBuild"), built
            assert job in built["message"] and builder in built["message"]
            assert obj["status"]["phase"] == "Building"

    await cluster.finish_job(job, succeeded=True)
    await wait_all(cluster, names, lambda o: o["status"].get("phase") == "Deploying", "Deploying")
    for name in names:
        await cluster.make_available(naming.triton_name(name))
    await wait_all(cluster, names, lambda o: o["status"].get("phase") == "Ready", "Ready")
    assert len(await job_names(cluster)) == 2
    waiter = await cluster.get("DeepSeekModel", next(n for n in names if n != builder))
    assert condition(waiter, "EngineBuilt")["reason"] == "EngineReused"
    assert waiter["status"]["engine"]["buildJob"] == job


async def test_deleting_the_builder_mid_build_hands_the_build_to_exactly_one_waiter(cluster, start_operator):
    await start_operator()
    names = ["a", "b", "c", "d"]
    await create_together(cluster, names)
    await wait_all(cluster, names, lambda o: built_reason(o) in ("BuildRunning", "WaitingForBuild"), "a build")
    (first,) = await job_names(cluster)
    builder = first.split("-build-")[0]

    await cluster.delete("DeepSeekModel", builder)  # the operator deletes its Job, as the collector would

    async def one_new_job():
        jobs = await job_names(cluster)
        return jobs if first not in jobs and len(jobs) == 1 else None

    (second,) = await cluster.wait_for(one_new_job, timeout=20, what="exactly one new build Job")
    await asyncio.sleep(1.0)  # the other waiters have looked again by now
    assert await job_names(cluster) == [second]
    heir = second.split("-build-")[0]
    assert heir in names and heir != builder
    waiters = [n for n in names if n not in (builder, heir)]
    await wait_all(cluster, waiters, lambda o: built_reason(o) == "WaitingForBuild" and second in
                   condition(o, "EngineBuilt")["message"], "waiting on the new Job")

    await cluster.finish_job(second, succeeded=True)
    await wait_all(cluster, [heir] + waiters, lambda o: o["status"].get("phase") == "Deploying", "Deploying")


async def test_a_failed_build_fails_every_waiter_with_the_jobs_reason_and_is_not_retried(cluster, start_operator):
    await start_operator()
    names = ["a", "b", "c"]
    await create_together(cluster, names)
    await wait_all(cluster, names, lambda o: built_reason(o) in ("BuildRunning", "WaitingForBuild"), "a build")
    (job,) = await job_names(cluster)

    await cluster.finish_job(job, succeeded=False, reason="DeadlineExceeded", message="Job was active longer")
    await wait_all(cluster, names, lambda o: o["status"].get("phase") == "Failed", "Failed")
    for name in names:
        built = condition(await cluster.get("DeepSeekModel", name), "EngineBuilt")
        assert built["reason"] == "DeadlineExceeded" and job in built["message"]
    await asyncio.sleep(1.0)
    assert await job_names(cluster) == [job]

    # Editing a waiter's engine fields releases it: a new key, its own build.
    await cluster.patch_spec("c", {"engine": {"maxBatchSize": 8}})
    await cluster.wait_model("c", lambda o: built_reason(o) == "BuildRunning", what="its own build")
    new_key = key_of({**SPEC, "engine": {**SPEC["engine"], "maxBatchSize": 8}})
    assert await job_names(cluster) == sorted([job, naming.build_job_name("c", new_key)])


async def test_a_restart_mid_build_starts_no_second_job(cluster, start_operator):
    first = await start_operator()
    names = ["a", "b", "c", "d", "e"]
    await create_together(cluster, names)
    await wait_all(cluster, names, lambda o: built_reason(o) in ("BuildRunning", "WaitingForBuild"), "a build")
    (job,) = await job_names(cluster)
    await asyncio.to_thread(first.stop)

    await start_operator()
    await asyncio.sleep(2.0)  # every model has resumed
    assert await job_names(cluster) == [job]
    await cluster.finish_job(job, succeeded=True)
    await wait_all(cluster, names, lambda o: o["status"].get("phase") == "Deploying", "Deploying")
    assert await job_names(cluster) == [job]
