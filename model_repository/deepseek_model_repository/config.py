"""config.pbtxt as data: plain dicts parsed into Triton's ``ModelConfig`` protobuf and written with ``text_format``.

Every builder here is a pure function of its arguments.  A misspelt field fails
in :func:`to_pbtxt` (``json_format.ParseDict`` refuses unknown fields), not
when Triton loads the model.  proto3 drops zero values, so ``max_batch_size: 0``
(no batching) simply does not appear in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from .serving.limits import GENERATION_INPUTS, GENERATION_OUTPUTS  # noqa: F401 - the generation models' tensors
from .serving.limits import RELAY_THREADS


@dataclass(frozen=True)
class Batching:
    """How Triton schedules a model's requests."""

    max_batch_size: int
    dynamic: bool = True
    max_queue_delay_us: int = 1000
    preferred_batch_sizes: Sequence[int] = ()


@dataclass(frozen=True)
class Placement:
    """Where a model's instances run: ``gpus`` > 0 places the engine on GPUs (KIND_GPU)."""

    gpus: int = 0
    instance_count: int = 1


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model (dims without the batch dimension)."""

    name: str
    data_type: str
    dims: Sequence[int] = (1,)
    optional: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "data_type": self.data_type, "dims": [int(d) for d in self.dims]}
        if self.optional:
            out["optional"] = True
        return out


@dataclass(frozen=True)
class Parameters:
    """String parameters a Python model reads from ``args['model_config']``."""

    values: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: {"string_value": str(v)} for k, v in sorted(self.values.items())}


def _batching(batching: Batching) -> dict[str, Any]:
    out: dict[str, Any] = {"max_batch_size": batching.max_batch_size}
    if batching.dynamic and batching.max_batch_size > 0:
        db: dict[str, Any] = {"max_queue_delay_microseconds": batching.max_queue_delay_us}
        sizes = sorted({s for s in batching.preferred_batch_sizes if 0 < s <= batching.max_batch_size})
        if sizes:
            db["preferred_batch_size"] = sizes
        out["dynamic_batching"] = db
    return out


def _instances(kind: str, count: int) -> list[dict[str, Any]]:
    return [{"kind": kind, "count": max(1, count)}]


def python_model_config(
    name: str,
    inputs: Iterable[Tensor],
    outputs: Iterable[Tensor],
    batching: Batching,
    *,
    instance_count: int = 1,
    decoupled: bool = False,
    parameters: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """A Python-backend model (the client-facing models and the local ONNX Runtime engine); runs on CPU."""
    cfg: dict[str, Any] = {
        "name": name,
        "backend": "python",
        **_batching(batching),
        "input": [t.as_dict() for t in inputs],
        "output": [t.as_dict() for t in outputs],
        "instance_group": _instances("KIND_CPU", instance_count),
    }
    if decoupled:
        cfg["model_transaction_policy"] = {"decoupled": True}
    if parameters:
        cfg["parameters"] = Parameters(parameters).as_dict()
    return cfg


def native_engine_config(
    name: str,
    platform: str,
    inputs: Iterable[Tensor],
    outputs: Iterable[Tensor],
    batching: Batching,
    placement: Placement,
    *,
    default_model_filename: Optional[str] = None,
) -> dict[str, Any]:
    """The engine under Triton's own backend: ``onnxruntime_onnx`` or ``tensorrt_plan``."""
    if platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise ValueError(f"unsupported engine platform {platform!r}: use onnxruntime_onnx or tensorrt_plan")
    kind = "KIND_GPU" if placement.gpus > 0 else "KIND_CPU"
    if platform == "tensorrt_plan" and kind != "KIND_GPU":
        raise ValueError("a TensorRT engine needs a GPU: set serving.gpusPerReplica >= 1 or use backend onnxruntime")
    cfg: dict[str, Any] = {
        "name": name,
        "platform": platform,
        **_batching(batching),
        "input": [t.as_dict() for t in inputs],
        "output": [t.as_dict() for t in outputs],
        "instance_group": _instances(kind, placement.instance_count),
    }
    if default_model_filename:
        cfg["default_model_filename"] = default_model_filename
    return cfg


def to_proto(cfg: dict[str, Any]) -> model_config_pb2.ModelConfig:
    """Parse a config dict into ``ModelConfig``; unknown fields and bad enum values raise ``ValueError``."""
    try:
        return json_format.ParseDict(cfg, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:
        raise ValueError(f"invalid Triton model config for {cfg.get('name')!r}: {exc}") from None


def to_pbtxt(cfg: dict[str, Any]) -> str:
    """The config.pbtxt text of a config dict."""
    return text_format.MessageToString(to_proto(cfg))


def parse_pbtxt(text: str) -> model_config_pb2.ModelConfig:
    """Read config.pbtxt text back (tests, and the CLI's --check)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


#: The Python backend's settings:
#: * shared memory, which every request and response crosses (and the previous path's KV tensors did, per step);
#: * the threads its Triton side runs BLS calls and decoupled sends on, per model instance (32 by default). A
#:   relayed plain request holds one until its final response (measured on Triton 2.51: with 32, no more than 32
#:   plain requests reached the scheduler, the rest waited in the relay, out of the queue metric's sight, and
#:   failed with "Server not ready" when the server began to shut down), so there is one for each relay thread and
#:   some to spare for the relay's cancel calls. The cost, measured on the 2-core CPU machine (bench/serving quick
#:   runs, Qwen2, alternating): plain requests at 32 clients at 0.73 to 0.77 of the bare loop against 0.83 to 0.84
#:   with 32 threads; streams and 8 clients unchanged. (An empty first response from the scheduler model, which
#:   would free the thread at once, left requests with a timeout hanging in the relay, so it is not used.)
PYTHON_BACKEND_CONFIG = ("shm-default-byte-size=33554432", "shm-growth-byte-size=16777216",
                         f"thread-pool-size={RELAY_THREADS + 16}")


def server_flags() -> list[str]:
    """tritonserver flags every deployment of this repository needs, in the cluster and locally.

    ``summary_latencies`` gives the p50/p99 request latencies the dashboard and alerts read.
    """
    return [
        "--allow-metrics=true",
        "--metrics-config=summary_latencies=true",
    ] + [f"--backend-config=python,{kv}" for kv in PYTHON_BACKEND_CONFIG]
