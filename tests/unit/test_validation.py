"""Validation of whole DeepSeekModel objects: defaults, explicit values, and errors that name the field."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from deepseek_operator import api
from deepseek_operator.crd import render_crd, render_crd_yaml


def resource(spec: dict | None = None, name: str = "r1", **top) -> dict:
    obj = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "models"},
        "spec": {"model": {"source": "hf://deepseek-ai/DeepSeek-R1"}, **(spec or {})},
    }
    obj.update(top)
    return obj


def test_defaults_fill_every_section():
    model = api.parse_resource(resource())
    spec = model.spec
    assert (model.name, model.namespace) == ("r1", "models")
    assert spec.model.task == "text-generation"
    assert (spec.engine.backend, spec.engine.precision, spec.engine.max_batch_size) == ("tensorrt", "fp16", 8)
    assert (spec.serving.replicas, spec.serving.gpus_per_replica) == (1, 1)
    assert spec.serving.image == api.DEFAULT_TRITON_IMAGE
    assert spec.autoscaling.enabled is False
    assert (spec.cache.claim_name, spec.cache.size) == ("deepseek-engine-cache", "100Gi")


def test_explicit_values_are_kept():
    model = api.parse_resource(resource({
        "model": {"source": "s3://bucket/models/r1", "task": "text-classification", "credentialsSecret": "s3"},
        "engine": {"backend": "onnxruntime", "precision": "int8", "maxBatchSize": 32, "maxSequenceLength": 512},
        "serving": {"replicas": 3, "gpusPerReplica": 0, "dynamicBatching": {"preferredBatchSizes": [8, 16]}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 9, "targetGPUUtilization": 55},
        "cache": {"claimName": "engines", "size": None},
    }))
    spec = model.spec
    assert spec.model.credentials_secret == "s3" and spec.model.task == "text-classification"
    assert (spec.engine.backend, spec.engine.precision, spec.engine.max_batch_size) == ("onnxruntime", "int8", 32)
    assert spec.serving.dynamic_batching.preferred_batch_sizes == [8, 16]
    assert (spec.autoscaling.min_replicas, spec.autoscaling.max_replicas) == (2, 9)
    assert spec.autoscaling.target_gpu_utilization == 55
    assert spec.cache.size is None


@pytest.mark.parametrize(
    "obj, field",
    [
        (resource({"model": {"source": "ftp://x/y"}}), "spec.model.source"),
        (resource({"model": None}), "spec.model"),
        (resource({"engine": {"maxBatchSize": 0}}), "spec.engine.maxBatchSize"),
        (resource({"engine": {"backend": "onnxruntime", "precision": "fp8"}, "serving": {"gpusPerReplica": 0}}),
         "spec.engine"),
        (resource({"engine": {"backend": "tensorrt"}, "serving": {"gpusPerReplica": 0}}), "serving.gpusPerReplica"),
        (resource({"serving": {"replicas": -1}}), "spec.serving.replicas"),
        (resource({"serving": {"dynamicBatching": {"preferredBatchSizes": [64]}}}),
         "serving.dynamicBatching.preferredBatchSizes"),
        (resource({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}), "spec.autoscaling"),
        (resource({"cache": {"size": "lots"}}), "spec.cache.size"),
        (resource({"servng": {}}), "spec.servng"),
        (resource(name="Bad_Name"), "metadata.name"),
        (resource(name="m" * 64), "metadata.name"),
        (resource(apiVersion="deepseek.ai/v1"), "apiVersion"),
    ],
)
def test_invalid_input_names_the_field(obj, field):
    with pytest.raises(api.SpecError) as err:
        api.parse_resource(obj)
    assert field in str(err.value)


def test_63_character_name_is_valid():
    assert api.parse_resource(resource(name="m" * 63)).name == "m" * 63


def test_crd_itself_validates_against_kubernetes_schema():
    kubernetes_validate.validate(render_crd(), "1.35.0", strict=True)
    crd = yaml.safe_load(render_crd_yaml())
    assert crd["spec"]["names"]["shortNames"] == ["dsm"]
