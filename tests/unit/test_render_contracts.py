"""The commands the renderers put in pods are accepted by the real CLIs, and agree on the engine key."""

from __future__ import annotations

import pytest

from deepseek_builder import api as builder_api
from deepseek_builder.cache import EngineCache
from deepseek_builder.cli import build
from deepseek_model_repository.cli import repository
from deepseek_contract.engine import engine_key
from deepseek_operator import engine_key as cachekey, render
from deepseek_operator.config import OperatorConfig

from test_render import AUTOSCALED, CPU, SCHEDULED, make_model

VARIANTS = [
    {},
    CPU,
    SCHEDULED,
    {**CPU, "model.adapter": {"source": "hf://org/lora", "revision": "r7"}, "model.task": "text-classification"},
    {**AUTOSCALED, "serving.dynamicBatching": {"preferredBatchSizes": [2, 4]}},
]


@pytest.mark.parametrize("patch", VARIANTS)
def test_build_job_command_parses_and_the_builder_derives_the_operators_spec_key(patch, tmp_path):
    model = make_model("r1", patch)
    key = cachekey.spec_key(model.spec)
    command = render.render_build_job(model, OperatorConfig(), key)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["deepseek-operator", "build"]
    params = build.make_context("build", command[2:]).params
    request = builder_api.default_request(
        source=params["source"], revision=params["revision"], task=params["task"], backend=params["backend"],
        precision=params["precision"], max_batch_size=params["max_batch_size"],
        max_sequence_length=params["max_seq_len"], adapter_source=params["adapter"],
        adapter_revision=params["adapter_revision"], gpu_type=params["gpu_type"], cache_dir=str(tmp_path),
        output_dir=params["output_dir"], model_name=params["model_name"],
    )
    assert engine_key(request.inputs) == key
    # The init container reads the ref where the builder's cache writes it.
    ref = EngineCache(tmp_path).ref_path(key).relative_to(tmp_path)
    assert render.engine_ref_path(key) == f"{render.CACHE_MOUNT}/{ref}"


@pytest.mark.parametrize("patch", VARIANTS)
def test_init_container_command_parses_with_the_repository_cli(patch):
    model = make_model("r1", patch)
    dep = render.render_deployment(model, OperatorConfig(), "k" * 20)
    command = dep["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[:2] == ["deepseek-operator", "repository"]
    params = repository.make_context("repository", command[2:]).params
    assert str(params["engine_ref"]) == render.engine_ref_path("k" * 20)
    assert params["model_name"] == "r1"
    assert params["gpus"] == model.spec.serving.gpus_per_replica
    assert list(params["preferred_batch_sizes"]) == model.spec.serving.dynamic_batching.preferred_batch_sizes
