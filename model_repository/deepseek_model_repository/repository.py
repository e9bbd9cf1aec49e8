"""Write a Triton model repository for one engine directory (see ENGINE_FORMAT.md).

For a DeepSeekModel named NAME the repository holds:

* ``NAME``: the client-facing Python model.  Text generation: text in, completion
  out, with dynamic batching (one batched prefill and batched decode steps per
  execution).  Triton's HTTP endpoint and gRPC's unary call refuse decoupled
  models, so ``NAME`` answers with one response; ``NAME_stream`` is the same
  model in decoupled mode, streaming tokens over gRPC as they are made.
  Classification and feature extraction: label + probabilities, or embedding.
* ``NAME_engine``: the engine.  ``runtime="triton"`` uses Triton's native
  backends (``onnxruntime_onnx`` or ``tensorrt_plan``) with the engine file
  linked into ``NAME_engine/1/``; ``runtime="local"`` wraps the ONNX engine in a
  Python model running onnxruntime, because the Triton bundled with PyTriton has
  only the Python backend.

Python models find ``model-info.json`` and the tokenizer through the
``engine_dir`` parameter of their config.pbtxt.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from deepseek_contract.layout import MODEL_INFO
from deepseek_contract.model_info import ModelInfo, ModelInfoError

from . import config as cfg
from .serving.detokenize import DEFAULT_STREAM_INTERVAL
from .serving.limits import RELAY_THREADS
from .serving.scheduler import DEFAULT_PREFILL_TOKENS

Runtime = Literal["triton", "local"]
DEFAULT_MAX_TOKENS = 64
#: Triton's queue delay, in microseconds, where none is given (``serving.dynamicBatching.maxQueueDelayMicroseconds``
#: unset): classification and embeddings wait up to this long for a larger batch.
DEFAULT_QUEUE_DELAY_US = 1000


def default_queue_delay_us(task: str) -> int:
    """The queue delay a ``task`` gets by default: text generation hands each request to its scheduler at once (it
    batches in flight by itself, so a delay only adds to the time to the first token), other tasks
    :data:`DEFAULT_QUEUE_DELAY_US`."""
    return 0 if task == "text-generation" else DEFAULT_QUEUE_DELAY_US


class RepositoryError(ValueError):
    """An engine directory or an argument that cannot make a repository; the message says what to fix."""


@dataclass(frozen=True)
class ModelNames:
    """The Triton model names derived from a DeepSeekModel's name."""

    client: str
    stream: str
    engine: str

    @classmethod
    def of(cls, name: str) -> "ModelNames":
        return cls(client=name, stream=f"{name}_stream", engine=f"{name}_engine")


def read_model_info(engine_dir: Union[str, Path]) -> dict[str, Any]:
    """Load and check ``model-info.json`` of an engine directory (the schema is the contract's ModelInfo)."""
    try:
        return ModelInfo.load(engine_dir).model_dump(exclude_none=True)
    except ModelInfoError as exc:
        raise RepositoryError(str(exc)) from None


def _tensors(specs: Sequence[dict[str, Any]]) -> list[cfg.Tensor]:
    return [cfg.Tensor(s["name"], s["data_type"], tuple(s["dims"])) for s in specs]


def client_model_outputs(info: dict[str, Any]) -> list[cfg.Tensor]:
    """Outputs of the client-facing model for the engine's task."""
    task = info["task"]
    if task == "text-generation":
        return [cfg.Tensor(name, data_type, dims) for name, data_type, dims in cfg.GENERATION_OUTPUTS]
    if task == "text-classification":
        return [
            cfg.Tensor("label", "TYPE_STRING", (1,)),
            cfg.Tensor("probabilities", "TYPE_FP32", (len(info["labels"]),)),
        ]
    return [cfg.Tensor("embedding", "TYPE_FP32", (-1,))]


def client_model_inputs(info: dict[str, Any]) -> list[cfg.Tensor]:
    """Inputs of the client-facing model: text_input, plus the sampling controls for text generation."""
    if info["task"] == "text-generation":
        return [cfg.Tensor(n, t, dims, optional) for n, t, optional, dims in cfg.GENERATION_INPUTS]
    return [cfg.Tensor("text_input", "TYPE_STRING", (1,))]


def render_configs(
    info: dict[str, Any],
    engine_dir: Union[str, Path],
    model_name: str,
    *,
    runtime: Runtime,
    max_queue_delay_us: Optional[int] = None,
    preferred_batch_sizes: Sequence[int] = (),
    gpus: int = 0,
    instance_count: int = 1,
    dynamic_batching: bool = True,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    stream_interval: int = DEFAULT_STREAM_INTERVAL,
    engine_threads: int = 0,
    request_timeout_s: float = 0,
    prefill_chunk_tokens: int = DEFAULT_PREFILL_TOKENS,
    share_prefixes: bool = True,
    relay_threads: int = RELAY_THREADS,
) -> dict[str, dict[str, Any]]:
    """The config dicts of every model in the repository, keyed by model name (pure: no I/O)."""
    if runtime not in ("triton", "local"):
        raise RepositoryError(f"runtime {runtime!r} must be 'triton' or 'local'")
    if info["backend"] == "tensorrt" and runtime == "local":
        raise RepositoryError(
            "the local mode serves ONNX Runtime engines only (PyTriton's Triton has no TensorRT backend): "
            "set spec.engine.backend: onnxruntime to run this model locally"
        )
    if info["backend"] == "tensorrt" and gpus < 1:
        raise RepositoryError("a TensorRT engine needs a GPU: set serving.gpusPerReplica >= 1 or use onnxruntime")
    if stream_interval < 1:
        raise RepositoryError(f"stream interval {stream_interval} must be at least 1 token per streamed response")
    if engine_threads < 0:
        raise RepositoryError(f"engine threads {engine_threads} must be 0 (the container's CPUs) or more")
    if not request_timeout_s >= 0:
        raise RepositoryError(f"request timeout {request_timeout_s} s must be 0 (no limit) or more")
    if prefill_chunk_tokens < 1:
        raise RepositoryError(f"prefill chunk of {prefill_chunk_tokens} tokens must be at least 1 prompt token")
    if not 1 <= relay_threads <= RELAY_THREADS:
        raise RepositoryError(f"relay threads {relay_threads} must be from 1 to {RELAY_THREADS} (the Python backend's "
                              "threads in Triton's process are sized for that many)")
    bad = [s for s in preferred_batch_sizes if s < 1 or s > info["max_batch_size"]]
    if bad:
        raise RepositoryError(
            f"preferred batch sizes {bad} must be between 1 and the engine's max batch size ({info['max_batch_size']})"
        )
    if max_queue_delay_us is None:
        max_queue_delay_us = default_queue_delay_us(info["task"])
    names = ModelNames.of(model_name)
    engine_dir = str(Path(engine_dir).resolve())
    configs: dict[str, dict[str, Any]] = {}
    inputs, outputs = client_model_inputs(info), client_model_outputs(info)
    if info["task"] == "text-generation":
        # In-flight batching: the scheduler model owns the engine and its KV cache (one per replica);
        # Triton's queue only hands requests over, so preferred batch sizes have no meaning here.  The queue
        # delay holds a request once, at the scheduler's model: the relay passes plain requests on at once
        # (held at both, a plain request waited twice the delay).
        handover = cfg.Batching(max_batch_size=int(info["max_batch_size"]), dynamic=dynamic_batching,
                                max_queue_delay_us=max_queue_delay_us)
        relay = cfg.Batching(max_batch_size=handover.max_batch_size, dynamic=dynamic_batching, max_queue_delay_us=0)
        configs[names.client] = cfg.python_model_config(
            names.client, inputs, outputs, relay,
            parameters={"scheduler_model": names.stream, "relay_threads": str(relay_threads)}
        )
        configs[names.stream] = cfg.python_model_config(
            names.stream, inputs, outputs, handover, decoupled=True,
            parameters={"engine_dir": engine_dir, "client_model": names.client,
                        "default_max_tokens": str(default_max_tokens), "stream_interval": str(stream_interval),
                        "engine_threads": str(engine_threads), "device": "cuda" if gpus > 0 else "cpu",
                        "request_timeout_s": repr(float(request_timeout_s)),
                        "prefill_chunk_tokens": str(prefill_chunk_tokens),
                        "share_prefixes": "true" if share_prefixes else "false"},
        )
        for c in configs.values():
            cfg.to_proto(c)
        return configs
    batching = cfg.Batching(
        max_batch_size=int(info["max_batch_size"]),
        dynamic=dynamic_batching,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=tuple(preferred_batch_sizes),
    )
    # The engine batches whatever the client model hands it in one call; a short delay lets
    # separate client-model instances share an engine pass too.
    engine_batching = cfg.Batching(
        max_batch_size=batching.max_batch_size, dynamic=dynamic_batching, max_queue_delay_us=0
    )
    placement = cfg.Placement(gpus=gpus, instance_count=instance_count)
    params = {"engine_dir": engine_dir, "engine_model": names.engine}
    configs[names.client] = cfg.python_model_config(
        names.client, inputs, outputs, batching, instance_count=instance_count, parameters=params
    )
    engine_inputs, engine_outputs = _tensors(info["inputs"]), _tensors(info["outputs"])
    if runtime == "local":
        configs[names.engine] = cfg.python_model_config(
            names.engine,
            engine_inputs,
            engine_outputs,
            engine_batching,
            instance_count=instance_count,
            parameters={"engine_dir": engine_dir, "engine_file": info["engine_file"]},
        )
    else:
        platform = "tensorrt_plan" if info["backend"] == "tensorrt" else "onnxruntime_onnx"
        configs[names.engine] = cfg.native_engine_config(
            names.engine,
            platform,
            engine_inputs,
            engine_outputs,
            engine_batching,
            placement,
            default_model_filename=engine_filename(info),
        )
    for c in configs.values():
        cfg.to_proto(c)  # fail here, not in Triton, on a malformed config
    return configs


def engine_filename(info: dict[str, Any]) -> str:
    """The name Triton's native backend expects in the version directory."""
    return "model.plan" if info["backend"] == "tensorrt" else "model.onnx"


def _python_model_source(kind: str) -> str:
    return resources.files("deepseek_model_repository.models").joinpath(kind, "model.py").read_text()


def _python_model_kind(model: str, info: dict[str, Any], names: ModelNames) -> Optional[str]:
    if model == names.engine:
        return "ort_engine"
    if info["task"] != "text-generation":
        return "encode"
    return "generate" if model == names.stream else "relay"


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.symlink(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def write_repository(
    engine_dir: Union[str, Path],
    output_dir: Union[str, Path],
    model_name: str,
    *,
    runtime: Runtime,
    max_queue_delay_us: Optional[int] = None,
    preferred_batch_sizes: Sequence[int] = (),
    gpus: int = 0,
    instance_count: int = 1,
    dynamic_batching: bool = True,
    link: bool = True,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    stream_interval: int = DEFAULT_STREAM_INTERVAL,
    engine_threads: int = 0,
    request_timeout_s: float = 0,
    prefill_chunk_tokens: int = DEFAULT_PREFILL_TOKENS,
    share_prefixes: bool = True,
    relay_threads: int = RELAY_THREADS,
) -> Path:
    """Write (or replace) this engine's models in ``output_dir`` and return it.

    Other models already in ``output_dir`` are left alone, so several engines can
    share one repository.  Each model directory is written beside its final place
    and renamed in, so a reader never sees half a model.
    """
    engine_dir = Path(engine_dir).resolve()
    output_dir = Path(output_dir)
    info = read_model_info(engine_dir)
    engine_file = engine_dir / info["engine_file"]
    if not engine_file.is_file():
        raise RepositoryError(f"{engine_file}: the engine file named in {MODEL_INFO} is missing")
    configs = render_configs(
        info,
        engine_dir,
        model_name,
        runtime=runtime,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=preferred_batch_sizes,
        gpus=gpus,
        instance_count=instance_count,
        dynamic_batching=dynamic_batching,
        default_max_tokens=default_max_tokens,
        stream_interval=stream_interval,
        engine_threads=engine_threads,
        request_timeout_s=request_timeout_s,
        prefill_chunk_tokens=prefill_chunk_tokens,
        share_prefixes=share_prefixes,
        relay_threads=relay_threads,
    )
    names = ModelNames.of(model_name)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (names.client, names.stream, names.engine):  # e.g. an engine model an older format had
        if stale not in configs and (output_dir / stale).is_dir():
            shutil.rmtree(output_dir / stale, ignore_errors=True)
    for model, config in configs.items():
        staging = output_dir / f".{model}.{uuid.uuid4().hex[:8]}"
        version = staging / "1"
        version.mkdir(parents=True)
        (staging / "config.pbtxt").write_text(cfg.to_pbtxt(config))
        if config.get("backend") == "python":
            kind = _python_model_kind(model, info, names)
            (version / "model.py").write_text(_python_model_source(kind))
        if model == names.engine:
            # The engine file sits in the version directory under the name the native backend
            # expects; ONNX external data must keep its own name beside it.
            _link_or_copy(engine_file, version / engine_filename(info), link)
            for extra in sorted(engine_file.parent.glob(engine_file.name + ".data")) + sorted(
                engine_file.parent.glob("*.onnx_data")
            ):
                _link_or_copy(extra, version / extra.name, link)
        final = output_dir / model
        if final.exists() or final.is_symlink():
            old = output_dir / f".{model}.old.{uuid.uuid4().hex[:8]}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    return output_dir


def resolve_engine_ref(ref_path: Union[str, Path]) -> Path:
    """The engine directory a ``<cache>/refs/<key>.json`` points at."""
    ref_path = Path(ref_path)
    try:
        ref = json.loads(ref_path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{ref_path}: no such engine ref; has the build finished?") from None
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{ref_path}: not valid JSON ({exc})") from None
    rel = ref.get("engine_dir")
    if not rel:
        raise RepositoryError(f"{ref_path}: has no 'engine_dir'")
    path = Path(rel)
    if not path.is_absolute():
        path = ref_path.resolve().parent.parent / path
    return path
