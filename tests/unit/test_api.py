"""The DeepSeekModel API: defaults, errors that name the field, and CEL rules that agree with pydantic."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema
import pytest

from deepseek_operator import api, crd

BASE = {"model": {"source": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}}


def spec_with(**patch: Any) -> dict:
    """BASE with dotted-path overrides, e.g. spec_with(**{"engine.precision": "bf16"})."""
    spec = copy.deepcopy(BASE)
    for path, value in patch.items():
        node = spec
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def test_defaults_match_the_documented_contract():
    s = api.parse_spec(BASE)
    assert s.model.task == "text-generation"
    assert (s.engine.backend, s.engine.precision) == ("tensorrt", "fp16")
    assert (s.engine.max_batch_size, s.engine.max_sequence_length) == (8, 2048)
    assert (s.serving.replicas, s.serving.gpus_per_replica) == (1, 1)
    assert s.autoscaling.enabled is False and s.autoscaling.target_gpu_utilization == 70
    assert s.cache.claim_name == "deepseek-engine-cache"


def test_wire_form_is_camel_case_and_round_trips():
    s = api.parse_spec(spec_with(**{"autoscaling.targetGPUUtilization": 55, "engine.maxBatchSize": 16}))
    wire = s.wire()
    assert wire["autoscaling"]["targetGPUUtilization"] == 55
    assert wire["engine"]["maxBatchSize"] == 16
    assert api.parse_spec(wire) == s


@pytest.mark.parametrize(
    "patch, field, words",
    [
        ({"model.source": "ftp://host/model"}, "spec.model.source", "hf://"),
        ({"model.source": "hf://only-org"}, "spec.model.source", "not a supported source"),
        ({"model.task": "translation"}, "spec.model.task", "text-generation"),
        ({"model.adapter": {"source": "gs://bucket/lora"}}, "spec.model.adapter.source", "not a supported source"),
        ({"engine.backend": "vllm"}, "spec.engine.backend", "tensorrt"),
        ({"engine.maxBatchSize": 0}, "spec.engine.maxBatchSize", "greater than or equal to 1"),
        ({"engine.maxBatchSize": 1025}, "spec.engine.maxBatchSize", "less than or equal to 1024"),
        ({"engine.maxSequenceLength": 15}, "spec.engine.maxSequenceLength", "16"),
        ({"engine.backend": "onnxruntime", "engine.precision": "bf16", "serving.gpusPerReplica": 0},
         "spec.engine", "fp32, fp16 or int8"),
        ({"serving.replicas": -1}, "spec.serving.replicas", "greater than or equal to 0"),
        ({"serving.dynamicBatching.preferredBatchSizes": [4, 16]}, "spec", "exceed engine.maxBatchSize"),
        ({"serving.dynamicBatching.preferredBatchSizes": [0]}, "spec.serving.dynamicBatching.preferredBatchSizes",
         "at least 1"),
        ({"serving.dynamicBatching.maxQueueDelayMicroseconds": -5},
         "spec.serving.dynamicBatching.maxQueueDelayMicroseconds", "greater than or equal to 0"),
        ({"serving.streamInterval": 0}, "spec.serving.streamInterval", "greater than or equal to 1"),
        ({"serving.requestTimeoutSeconds": -1}, "spec.serving.requestTimeoutSeconds", "greater than or equal to 0"),
        ({"serving.prefillChunkTokens": 0}, "spec.serving.prefillChunkTokens", "greater than or equal to 1"),
        ({"serving.drainSeconds": -1}, "spec.serving.drainSeconds", "greater than or equal to 0"),
        ({"serving.engineThreads": -2, "serving.gpusPerReplica": 0}, "spec.serving.engineThreads",
         "greater than or equal to 0"),
        ({"serving.engineThreads": 4}, "spec", "set it only with serving.gpusPerReplica 0"),
        ({"serving.resources": {"limits": {"memory": "lots"}}}, "spec.serving.resources.limits", "quantity"),
        ({"serving.gpusPerReplica": 0}, "spec", "gpusPerReplica >= 1"),
        ({"autoscaling.minReplicas": 5, "autoscaling.maxReplicas": 2}, "spec.autoscaling", "must not exceed"),
        ({"autoscaling.targetGPUUtilization": 101}, "spec.autoscaling.targetGPUUtilization", "100"),
        ({"autoscaling.metricsBackend": "datadog"}, "spec.autoscaling.metricsBackend", "keda"),
        ({"cache.size": "big"}, "spec.cache.size", "quantity"),
        ({"autoscaling.metricsBackend": "keda"}, "spec.autoscaling.prometheusAddress", "required when"),
        ({"engine.maxBatchsize": 4}, "spec.engine.maxBatchsize", "unknown field"),
        ({"model.source": "s3://AKIAXXXX:SECRETYYYY@bucket/r1"}, "spec.model.source", "credentialsSecret"),
        ({"model.source": "hf://user:hf_token@org/name"}, "spec.model.source", "credentialsSecret"),
        ({"model.adapter": {"source": "s3://KEY:SECRET@bucket/lora"}}, "spec.model.adapter.source",
         "credentialsSecret"),
    ],
)
def test_invalid_specs_are_refused_with_the_field_named(patch, field, words):
    with pytest.raises(api.SpecError) as err:
        api.parse_spec(spec_with(**patch))
    message = str(err.value)
    assert f"{field}:" in message, message
    assert words in message, message


def test_a_refused_credential_is_never_echoed():
    with pytest.raises(api.SpecError) as err:
        api.parse_spec(spec_with(**{"model.source": "s3://AKIAXXXX:SECRETYYYY@bucket/r1"}))
    assert "SECRETYYYY" not in str(err.value) and "AKIAXXXX" not in str(err.value)


def test_parse_resource_checks_kind_and_name():
    with pytest.raises(api.SpecError) as err:
        api.parse_resource({"apiVersion": "deepseek.ai/v1", "kind": "Model", "metadata": {"name": "Bad_Name"},
                            "spec": BASE})
    text = str(err.value)
    assert "apiVersion" in text and "kind" in text and "metadata.name" in text


def test_a_63_character_name_is_accepted():
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "a" * 63}, "spec": BASE}
    assert api.parse_resource(obj).name == "a" * 63


# ------------------------------------------------------------------ the CRD
def _walk(schema: dict, path: str = "spec"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _version() -> dict:
    return crd.render_crd()["spec"]["versions"][0]


def test_every_spec_field_has_a_description_for_kubectl_explain():
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [p for p, s in _walk(spec) if not s.get("description") and not p.endswith(("[]", "{}"))]
    assert missing == []


def test_crd_schema_is_structural():
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(spec):
        assert "type" in node, f"{path} has no type"
        assert not ({"anyOf", "oneOf", "$ref", "allOf"} & node.keys()), path
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_crd_names_printer_columns_and_status_subresource():
    c = crd.render_crd()
    assert c["spec"]["names"]["shortNames"] == ["dsm"]
    v = _version()
    assert v["subresources"] == {"status": {}}
    columns = {col["name"] for col in v["additionalPrinterColumns"]}
    assert {"Model", "Precision", "Replicas", "Ready", "Phase", "Age"} <= columns


# ------------------------------------------------------------------ CEL rules agree with pydantic
def _apply_defaults(obj: Any, schema: dict) -> Any:
    """What the API server does before validation: fill defaults, recursively."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = _apply_defaults(obj[name], sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(o, schema["items"]) for o in obj]
    return obj


def _cel_errors(obj: Any, schema: dict) -> list[str]:
    """Evaluate every x-kubernetes-validations rule where it is attached, as the API server does."""
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(obj)})):
            errors.append(rule["message"])
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                errors += _cel_errors(obj[name], sub)
    return errors


def _api_server_accepts(spec: dict) -> tuple[bool, list[str]]:
    schema = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    obj = _apply_defaults(copy.deepcopy(spec), schema)
    try:
        jsonschema.Draft4Validator(schema).validate(obj)  # OpenAPI 3.0 schemas are draft-4 style
    except jsonschema.ValidationError as exc:
        return False, [exc.message]
    errors = _cel_errors(obj, schema)
    return not errors, errors


@pytest.mark.parametrize(
    "patch",
    [
        {},
        {"serving.dynamicBatching.preferredBatchSizes": [2, 8]},
        {"serving.dynamicBatching.preferredBatchSizes": [2, 9]},
        {"engine.maxBatchSize": 32, "serving.dynamicBatching.preferredBatchSizes": [16, 32]},
        {"engine.maxBatchSize": 4, "serving.dynamicBatching.preferredBatchSizes": [8]},
        {"autoscaling.minReplicas": 2, "autoscaling.maxReplicas": 2},
        {"autoscaling.minReplicas": 3, "autoscaling.maxReplicas": 2},
        {"autoscaling.minReplicas": 5},
        {"engine.backend": "onnxruntime", "engine.precision": "int8", "serving.gpusPerReplica": 0},
        {"engine.backend": "onnxruntime", "engine.precision": "fp8", "serving.gpusPerReplica": 0},
        {"engine.backend": "onnxruntime", "serving.gpusPerReplica": 1, "engine.precision": "bf16"},
        {"engine.backend": "onnxruntime", "serving.gpusPerReplica": 0},
        {"serving.gpusPerReplica": 0},
        {"engine.precision": "bf16"},
        {"autoscaling.metricsBackend": "keda"},
        {"autoscaling.metricsBackend": "keda", "autoscaling.prometheusAddress": "http://prometheus:9090"},
        # Sources: the four schemes, nothing else, and no credentials in the URL.
        {"model.source": "s3://bucket/models/r1"},
        {"model.source": "pvc://weights/r1"},
        {"model.source": "file:///models/r1"},
        {"model.source": "ftp://host/model"},
        {"model.source": "gs://bucket/model"},
        {"model.source": "hf://only-org"},
        {"model.source": "file://relative/path"},
        {"model.source": "s3://AKIA:SECRET@bucket/r1"},
        {"model.source": "hf://user:token@org/name"},
        {"model.source": "pvc://user@claim/path"},
        {"model.adapter": {"source": "hf://org/lora"}},
        {"model.adapter": {"source": "gs://bucket/lora"}},
        {"model.adapter": {"source": "s3://KEY:SECRET@bucket/lora"}},
        # Quantities and batch sizes.
        {"cache.size": "lots"},
        {"cache.size": "500Gi"},
        {"serving.resources": {"limits": {"memory": "lots"}}},
        {"engine.builderResources": {"requests": {"cpu": "2", "memory": "8Gi"}}},
        {"serving.initResources": {"limits": {"cpu": "one"}}},
        {"serving.dynamicBatching.preferredBatchSizes": [0, 2]},
        # Engine threads: CPU serving only (gpusPerReplica defaults to 1).
        {"serving.engineThreads": 3, "serving.gpusPerReplica": 0},
        {"serving.engineThreads": 0, "serving.gpusPerReplica": 2},
        {"serving.engineThreads": 3, "serving.gpusPerReplica": 1},
        {"serving.engineThreads": 3},
        {"serving.engineThreads": -1, "serving.gpusPerReplica": 0},
    ],
)
def test_cel_rules_and_pydantic_agree(patch):
    spec = spec_with(**patch)
    accepted, errors = _api_server_accepts(spec)
    try:
        api.parse_spec(spec)
        pydantic_ok = True
    except api.SpecError:
        pydantic_ok = False
    assert accepted == pydantic_ok, (patch, errors)
