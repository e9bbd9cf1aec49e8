"""config.pbtxt generation: dicts parsed through Triton's ModelConfig protobuf, never string templates."""

from __future__ import annotations

import pytest

from deepseek_model_repository import config as cfg

TEXT = [cfg.Tensor("text_input", "TYPE_STRING", (1,))]
OUT = [cfg.Tensor("text_output", "TYPE_STRING", (1,))]


def parsed(config: dict):
    return cfg.parse_pbtxt(cfg.to_pbtxt(config))


def test_dynamic_batching_carries_queue_delay_and_sorted_preferred_sizes():
    c = parsed(
        cfg.python_model_config(
            "m", TEXT, OUT, cfg.Batching(8, max_queue_delay_us=2500, preferred_batch_sizes=(8, 4, 4, 2))
        )
    )
    assert c.max_batch_size == 8
    assert c.dynamic_batching.max_queue_delay_microseconds == 2500
    assert list(c.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert c.backend == "python"
    assert c.instance_group[0].kind == c.instance_group[0].KIND_CPU


def test_dynamic_batching_off_leaves_no_batcher():
    c = parsed(cfg.python_model_config("m", TEXT, OUT, cfg.Batching(8, dynamic=False)))
    assert not c.HasField("dynamic_batching")
    assert c.max_batch_size == 8


def test_max_batch_size_zero_is_dropped_by_proto3_and_disables_batcher():
    text = cfg.to_pbtxt(cfg.python_model_config("m", TEXT, OUT, cfg.Batching(0)))
    assert "max_batch_size" not in text
    assert "dynamic_batching" not in text


def test_optional_inputs_and_decoupled_policy():
    inputs = TEXT + [cfg.Tensor("max_tokens", "TYPE_INT32", (1,), optional=True)]
    c = parsed(cfg.python_model_config("m", inputs, OUT, cfg.Batching(4), decoupled=True, parameters={"a": "b"}))
    assert [i.optional for i in c.input] == [False, True]
    assert c.model_transaction_policy.decoupled is True
    assert c.parameters["a"].string_value == "b"


@pytest.mark.parametrize(
    ("platform", "gpus", "kind"),
    [("onnxruntime_onnx", 0, "KIND_CPU"), ("onnxruntime_onnx", 1, "KIND_GPU"), ("tensorrt_plan", 2, "KIND_GPU")],
)
def test_native_engine_instance_groups(platform, gpus, kind):
    c = parsed(
        cfg.native_engine_config(
            "e", platform, TEXT, OUT, cfg.Batching(8), cfg.Placement(gpus=gpus, instance_count=2)
        )
    )
    assert c.platform == platform
    assert c.instance_group[0].count == 2
    assert c.instance_group[0].kind == getattr(c.instance_group[0], kind)


def test_tensorrt_on_cpu_is_refused():
    with pytest.raises(ValueError, match="needs a GPU"):
        cfg.native_engine_config("e", "tensorrt_plan", TEXT, OUT, cfg.Batching(8), cfg.Placement(gpus=0))


def test_unknown_platform_is_refused():
    with pytest.raises(ValueError, match="unsupported engine platform"):
        cfg.native_engine_config("e", "pytorch_libtorch", TEXT, OUT, cfg.Batching(8), cfg.Placement())


@pytest.mark.parametrize(
    "bad",
    [{"name": "m", "max_batch_sise": 8}, {"name": "m", "input": [{"name": "x", "data_type": "TYPE_STRNG"}]}],
)
def test_misspelt_fields_fail_at_generation_not_in_triton(bad):
    with pytest.raises(ValueError, match="invalid Triton model config"):
        cfg.to_pbtxt(bad)
