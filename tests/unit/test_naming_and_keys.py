"""Child names stay within Kubernetes' limits; the engine key changes exactly when the engine would."""

from __future__ import annotations

import re

import pytest

from deepseek_contract.engine import engine_key
from deepseek_contract.versions import TENSORRT_VERSION
from deepseek_operator import api, engine_key as cachekey, naming

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LONGEST = "m" * 63


@pytest.mark.parametrize("cr_name", ["a", "r1-distill-7b", LONGEST, "x" * 40 + "-" + "y" * 22])
def test_child_names_are_dns_labels_for_any_valid_cr_name(cr_name):
    key = "0123456789abcdef0123"
    for name in (naming.triton_name(cr_name), naming.build_job_name(cr_name, key)):
        assert len(name) <= 63 and DNS_LABEL.match(name), name
    for value in naming.standard_labels(cr_name, "triton").values():
        assert len(value) <= 63


def test_long_names_that_share_a_prefix_stay_distinct():
    a, b = "p" * 60 + "abc", "p" * 60 + "abd"
    assert naming.triton_name(a) != naming.triton_name(b)


def test_short_names_are_readable():
    assert naming.triton_name("r1") == "r1-triton"
    assert naming.build_job_name("r1", "abcdef0123456789abcd") == "r1-build-abcdef0123"


def _spec(**patch):
    base = {"model": {"source": "hf://deepseek-ai/DeepSeek-V2-Lite", "revision": "abc123"}}
    for path, value in patch.items():
        node = base
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return api.parse_spec(base)


BASE_KEY = cachekey.spec_key(_spec())


@pytest.mark.parametrize(
    "patch",
    [
        {"model.revision": "def456"},
        {"model.adapter": {"source": "hf://org/lora"}},
        {"model.task": "feature-extraction"},
        {"engine.precision": "bf16"},
        {"engine.maxBatchSize": 16},
        {"engine.maxSequenceLength": 4096},
        {"serving.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}},
    ],
)
def test_engine_fields_change_the_key(patch):
    assert cachekey.spec_key(_spec(**patch)) != BASE_KEY


@pytest.mark.parametrize(
    "patch",
    [
        {"serving.replicas": 3},
        {"serving.dynamicBatching": {"maxQueueDelayMicroseconds": 5000, "preferredBatchSizes": [4]}},
        {"serving.resources": {"limits": {"memory": "64Gi"}}},
        {"serving.nodeSelector": {"topology.kubernetes.io/zone": "a"}},
        {"autoscaling.enabled": True, "autoscaling.maxReplicas": 8},
        {"serving.image": "nvcr.io/nvidia/tritonserver:25.06-py3"},
    ],
)
def test_serving_and_autoscaling_fields_never_change_the_key(patch):
    assert cachekey.spec_key(_spec(**patch)) == BASE_KEY


def test_content_key_adds_the_resolved_source():
    inputs = cachekey.inputs_from_spec(_spec())
    assert engine_key(inputs, "sha-1") != engine_key(inputs, "sha-2")
    assert engine_key(inputs, "sha-1") != engine_key(inputs)


def test_tensorrt_keys_carry_the_pinned_tensorrt_version():
    inputs = cachekey.inputs_from_spec(_spec())
    assert ("tensorrt", TENSORRT_VERSION) in inputs.toolchain


@pytest.mark.parametrize("backend, precision", [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tensorrt", "fp16")])
def test_the_engine_format_version_is_part_of_the_key(monkeypatch, backend, precision):
    """An engine built for an earlier format (what its runner reads and writes) is rebuilt, never reused."""
    from deepseek_contract import engine as contract

    spec = _spec(**{"engine.backend": backend, "engine.precision": precision})
    assert ("engine-format", str(contract.ENGINE_FORMAT_VERSION)) in contract.default_toolchain(backend, precision)
    key = cachekey.spec_key(spec)
    monkeypatch.setattr(contract, "ENGINE_FORMAT_VERSION", contract.ENGINE_FORMAT_VERSION + 1)
    assert cachekey.spec_key(spec) != key
