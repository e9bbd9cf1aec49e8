"""The example DeepSeekModels in manifests/examples/: valid for the operator and for the generated CRD.

The CRD check is structural: jsonschema against the CRD's openAPIV3Schema (an OpenAPI 3.0 schema, so
draft 4 semantics), with every object that lists its properties closed to others, as kubectl's strict
field validation (the default) treats them. Kubernetes' extensions (CEL rules, defaults) are ignored
there; the pydantic check covers the cross-field rules.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from deepseek_operator.api import API_VERSION, KIND, SpecError, parse_resource

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def closed(schema: dict) -> dict:
    """The schema with unknown fields refused wherever an object lists its properties."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text(encoding="utf-8"))
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft4Validator(closed(version["schema"]["openAPIV3Schema"]))


def crd_errors(validator: jsonschema.Draft4Validator, obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_deepseekmodel(path):
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) == (API_VERSION, KIND)
        parse_resource(doc)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_crd_schema(path, crd_validator):
    for doc in documents(path):
        assert crd_errors(crd_validator, doc) == []


def test_crd_schema_check_refuses_what_the_api_refuses(crd_validator):
    """The structural check is not vacuous: a misspelt enum, a wrong type and an unknown field fail."""
    doc = documents(EXAMPLES[0])[0]
    for path, value, field in (
        (("spec", "engine", "backend"), "tensorrt-llm", "spec.engine.backend"),
        (("spec", "serving", "gpusPerReplica"), "one", "spec.serving.gpusPerReplica"),
        (("spec", "autoscaling", "maxReplica"), 4, "spec.autoscaling"),
    ):
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        errors = crd_errors(crd_validator, bad)
        assert any(e.startswith(field) for e in errors), errors
        with pytest.raises(SpecError):
            parse_resource(bad)


def test_examples_cover_a_gpu_autoscaled_r1_distill_and_a_cpu_lora_classifier():
    models = [parse_resource(doc) for path in EXAMPLES for doc in documents(path)]
    gpu = [
        m for m in models
        if m.spec.model.source.startswith("hf://deepseek-ai/DeepSeek-R1-Distill")
        and m.spec.engine.backend == "tensorrt"
        and m.spec.engine.precision == "fp16"
        and m.spec.serving.gpus_per_replica >= 1
        and "nvidia.com/gpu.product" in m.spec.serving.node_selector
        and m.spec.autoscaling.enabled
    ]
    cpu = [
        m for m in models
        if m.spec.engine.backend == "onnxruntime"
        and m.spec.model.task == "text-classification"
        and m.spec.serving.gpus_per_replica == 0
        and m.spec.model.adapter is not None
    ]
    assert gpu, "no example serves an R1-Distill model with TensorRT fp16 on a selected GPU, autoscaled"
    assert cpu, "no example serves a LoRA-adapted classifier with ONNX Runtime on CPU"


def test_example_paths_named_in_the_docs_exist():
    texts = [ROOT / "charts" / "deepseek-operator" / "templates" / "NOTES.txt", ROOT / "docs" / "install.md"]
    named = {m for t in texts if t.is_file() for m in re.findall(r"manifests/examples/[\w.-]+\.yaml", t.read_text())}
    assert named, "neither NOTES.txt nor docs/install.md names an example"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"documented examples that do not exist: {missing}"
