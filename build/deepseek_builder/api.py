"""The build: checkpoint -> (merge) -> ONNX -> check -> engine, cached under the content key.

``build(request)`` is what `deepseek-operator build` and the local mode run.  Stages:
resolve (pin the source, compute keys; a cache hit stops here), download, load, merge,
export, check, engine, repository.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Union

from deepseek_contract.engine import EngineInputs, default_toolchain, engine_key, recipe
from deepseek_contract.layout import BUILD_REPORT, ENGINE_FILES, TOKENIZER_DIR
from deepseek_contract.model_info import MODEL_INFO_FORMAT, ModelInfo
from deepseek_contract.versions import TENSORRT_VERSION, TRITON_RELEASE
from deepseek_contract.vocabulary import BACKEND_PRECISIONS, BACKENDS, TASKS

from . import sources
from .cache import EngineCache, default_cache_dir
from .errors import BuildError
from .progress import Progress



@dataclass
class BuildResult:
    engine_dir: Path
    content_key: str
    spec_key: str
    reused: bool
    report: dict[str, Any]
    output_dir: Optional[Path] = None


@dataclass
class BuildRequest:
    inputs: EngineInputs
    cache_dir: Path
    output_dir: Optional[Path] = None
    model_name: str = "deepseek"
    runtime: str = "triton"
    #: Passed to write_repository: max_queue_delay_us, preferred_batch_sizes, instance_count.
    serving: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ validation and versions
def validate(inputs: EngineInputs) -> None:
    """Refuse what cannot be built, before anything is downloaded."""
    if inputs.task not in TASKS:
        raise BuildError(f"task {inputs.task!r} is not supported; choose one of {', '.join(TASKS)}")
    if inputs.backend not in BACKENDS:
        raise BuildError(f"backend {inputs.backend!r} is not supported; choose onnxruntime or tensorrt")
    if inputs.max_batch_size < 1 or inputs.max_sequence_length < 2:
        raise BuildError("--max-batch-size must be >= 1 and --max-seq-len >= 2")
    if inputs.backend == "onnxruntime":
        if inputs.precision not in BACKEND_PRECISIONS["onnxruntime"]:
            raise BuildError(f"onnxruntime engines are {', '.join(BACKEND_PRECISIONS['onnxruntime'])}; {inputs.precision} needs "
                             "--backend tensorrt")
    else:
        from .tensorrt_engine import check_tensorrt_available

        check_tensorrt_available(inputs.precision)


def check_config(inputs: EngineInputs, config: dict) -> None:
    """Refuse what the checkpoint's config.json rules out, as soon as it is known (before hashing or download)."""
    from . import architectures as arch

    arch.check_architecture(config, inputs.source)
    arch.check_sequence_length(config, inputs.max_sequence_length, inputs.source)


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def tool_versions() -> dict[str, Optional[str]]:
    versions = {name: _version(name) for name in ("torch", "transformers", "onnx", "onnxruntime", "peft")}
    trt = None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs"):
        trt = _version(dist)
        if trt:
            break
    versions["tensorrt"] = trt
    return versions


def real_toolchain(inputs: EngineInputs, gpu: Optional[dict]) -> tuple[tuple[str, str], ...]:
    """The versions that shape the engine's bytes (the content key's toolchain)."""
    v = tool_versions()
    tools = [*recipe(inputs.backend, inputs.precision), ("torch", v["torch"] or "?"),
             ("transformers", v["transformers"] or "?"), ("onnx", v["onnx"] or "?")]
    if inputs.backend == "onnxruntime":
        tools.append(("onnxruntime", v["onnxruntime"] or "?"))
    else:
        tools.append(("tensorrt", v["tensorrt"] or "?"))
        if gpu:
            tools.append(("gpu", f"{gpu['name']} sm_{gpu['compute_capability']}"))
    return tuple(tools)


def gpu_info() -> Optional[dict]:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


# ------------------------------------------------------------------ the build
def build(request: BuildRequest, log: Optional[Callable[[str], None]] = None) -> BuildResult:
    try:
        return _build(request, Progress(log))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise BuildError(f"no space left on device while writing {exc.filename or request.cache_dir}; free "
                             "space in the cache volume or give the build a bigger one") from None
        raise


def _build(request: BuildRequest, progress: Progress) -> BuildResult:
    inputs = request.inputs
    validate(inputs)
    spec_key = engine_key(replace(inputs, toolchain=default_toolchain(inputs.backend, inputs.precision)))
    cache = EngineCache(request.cache_dir)
    hashes = sources.FileHashCache(cache.root / "file-hashes.json")
    with progress.stage("resolve", inputs.source):
        downloads = cache.root / "downloads"
        source = sources.resolve(inputs.source, inputs.revision, hashes, downloads,
                                 on_config=lambda config: check_config(inputs, config))
        adapter = sources.resolve(inputs.adapter_source, inputs.adapter_revision, hashes, downloads, role="adapter") \
            if inputs.adapter_source else None
        hashes.save()
        gpu = gpu_info() if inputs.backend == "tensorrt" else None
        toolchain = real_toolchain(inputs, gpu)
        digest = source.digest + (f"|adapter={adapter.digest}" if adapter else "")
        content_key = engine_key(replace(inputs, toolchain=toolchain), digest)
        progress.say(f"source revision {source.revision}; spec key {spec_key}; content key {content_key}")

    entry, _ = cache.inspect(content_key)
    reused = entry is not None
    if entry is None:
        with cache.lock(content_key, on_wait=lambda: progress.say(
                f"another build of {content_key} is running on this volume; waiting for it")):
            entry, problem = cache.inspect(content_key)
            reused = entry is not None
            if problem:
                progress.say(f"engine {content_key} in the cache fails its integrity check: {problem}; "
                             "discarding it and rebuilding")
                cache.ref_path(spec_key).unlink(missing_ok=True)  # never left pointing at a missing entry
                cache.discard(content_key)
            if entry is None:
                entry, won = _build_entry(request, cache, progress, source, adapter, spec_key, content_key, toolchain,
                                          gpu)
                reused = not won
    if reused:
        progress.say(f"engine {content_key} is in the cache and matches its recorded hashes: reusing {entry}")
    report = json.loads((entry / BUILD_REPORT).read_text())
    cache.write_ref(spec_key, {"content_key": content_key, "engine_dir": cache.layout.entry_relative(content_key),
                               "spec_key": spec_key, "source": inputs.source, "source_revision": source.revision,
                               "built_at": report.get("built_at"), "backend": inputs.backend,
                               "precision": inputs.precision, "task": inputs.task})
    result = BuildResult(engine_dir=entry, content_key=content_key, spec_key=spec_key, reused=reused, report=report)
    if request.output_dir is not None:
        with progress.stage("repository", str(request.output_dir)):
            result.output_dir = write_output(entry, request, reused)
    return result


def write_output(entry: Path, request: BuildRequest, reused: bool) -> Path:
    """The Triton model repository for the engine, plus build-report.json, in ``request.output_dir``."""
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from deepseek_model_repository import write_repository

    gpus = 1 if request.inputs.backend == "tensorrt" else 0
    write_repository(entry, out, request.model_name, runtime=request.runtime, gpus=gpus, **request.serving)
    report = json.loads((entry / BUILD_REPORT).read_text())
    report["reused_from_cache"] = reused
    (out / BUILD_REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out


def _build_entry(request, cache, progress, source, adapter, spec_key, content_key, toolchain, gpu):
    work = cache.new_workdir()
    staged = work / "entry"
    try:
        try:
            report = _run_stages(request, cache, progress, source, adapter, work, staged, gpu)
        except Exception as exc:
            # Libraries that write files (the ONNX exporter, protobuf) turn ENOSPC into their own errors.
            if _disk_full(work) and not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
                raise OSError(errno.ENOSPC, "No space left on device", str(cache.root)) from exc
            raise
        report.update({"spec_key": spec_key, "content_key": content_key,
                       "toolchain": {k: v for k, v in toolchain}})
        (staged / BUILD_REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        entry, won = cache.publish(staged, content_key)
        if not won:
            progress.say("another builder finished the same engine first; using its entry")
        return entry, won
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_stages(request, cache, progress, source, adapter, work, staged, gpu) -> dict:
    import torch

    from . import architectures as arch
    from .check import check_engine, ort_runner
    from .export import export_onnx, export_spec

    inputs = request.inputs
    started = time.time()
    _quiet_libraries()
    with progress.stage("download", source.uri):
        check_config(inputs, sources.fetch_config(source, cache.root / "downloads"))  # before the weights move
        model_dir = sources.fetch(source, cache.root / "downloads", progress.say)
        adapter_dir = sources.fetch(adapter, cache.root / "downloads", progress.say) if adapter else None
        progress.say(f"{_size(model_dir) / 1e6:.1f} MB in {model_dir}")
    device = "cuda" if inputs.backend == "tensorrt" else "cpu"
    with progress.stage("load", f"{inputs.task}, {inputs.precision}"):
        config = arch.read_config(model_dir)
        model_type = arch.check_architecture(config, model_dir)
        arch.check_weights(model_dir)
        torch.manual_seed(0)
        model = arch.load_model(model_dir, inputs.task, precision=inputs.precision, backend=inputs.backend,
                                device=device)
        progress.say(f"{model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    if adapter_dir is not None:
        with progress.stage("merge", adapter.uri):
            model = arch.merge_adapter(model, adapter_dir, model_type)
    vocab = int(model.config.get_text_config().vocab_size)
    onnx_file = work / "export" / "model.onnx"
    with progress.stage("export", "ONNX (legacy TorchScript exporter), dynamic batch and sequence axes"):
        spec = export_spec(model, inputs.task)
        export_onnx(spec, onnx_file, vocab, device=device)
        progress.say(f"{_size(onnx_file.parent) / 1e6:.1f} MB")

    engine_file = staged / ENGINE_FILES[inputs.backend]
    engine_file.parent.mkdir(parents=True)
    float_outputs = [spec.output_names[0]]
    check_report: dict[str, Any] = {}
    if inputs.backend == "onnxruntime":
        with progress.stage("check", "the fp32 ONNX graph against PyTorch"):
            check_report["export"] = check_engine(spec, ort_runner(onnx_file, spec.output_names), precision="fp32",
                                                  max_batch=inputs.max_batch_size, max_seq=inputs.max_sequence_length,
                                                  vocab=vocab)
            progress.say(f"max relative error {check_report['export']['max_rel_error']:.2e}")
        from .ort_engine import build_ort_engine

        with progress.stage("engine", f"onnxruntime {inputs.precision}"):
            build_ort_engine(onnx_file, engine_file, inputs.precision, float_outputs)
            import numpy as np

            kv_dtype = np.float16 if inputs.precision == "fp16" else np.float32
            check_report["engine"] = check_engine(spec, ort_runner(engine_file, spec.output_names),
                                                  precision=inputs.precision, max_batch=inputs.max_batch_size,
                                                  max_seq=inputs.max_sequence_length, vocab=vocab,
                                                  engine_kv_dtype=kv_dtype)
            progress.say(f"{inputs.precision} engine: max relative error "
                         f"{check_report['engine']['max_rel_error']:.2e}")
    else:
        from .tensorrt_engine import build_tensorrt_engine, tensorrt_runner

        with progress.stage("engine", f"TensorRT {inputs.precision}"):
            timing = cache.root / "timing" / f"{_slug(gpu['name'] if gpu else 'gpu')}-trt{tool_versions()['tensorrt']}.cache"
            build_tensorrt_engine(onnx_file, engine_file, spec, max_batch=inputs.max_batch_size,
                                  max_seq=inputs.max_sequence_length, timing_cache=timing, log=progress.say)
        with progress.stage("check", "the TensorRT engine against PyTorch"):
            check_report["engine"] = check_engine(spec, tensorrt_runner(engine_file, spec), precision=inputs.precision,
                                                  max_batch=inputs.max_batch_size, max_seq=inputs.max_sequence_length,
                                                  vocab=vocab, device=device, engine_kv_dtype=_np_dtype(spec.dtype))
            progress.say(f"max relative error {check_report['engine']['max_rel_error']:.2e}")

    tokenizer_dir = staged / TOKENIZER_DIR
    tokenizer_dir.mkdir()
    for f in arch.tokenizer_files(model_dir):
        shutil.copyfile(f, tokenizer_dir / f.name)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise BuildError(f"{source.uri}: no tokenizer.json in the checkpoint; the serving models need it")
    model_info(inputs, model_type, spec, model_dir, config, model).dump(staged)
    check_report["max_rel_error"] = check_report["engine"]["max_rel_error"]
    v = tool_versions()
    return {
        "format": 1,
        "built_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "inputs": {**asdict(inputs), "toolchain": None},
        "source": inputs.source,
        "source_revision": source.revision,
        "source_digest": source.digest,
        "adapter": adapter.uri if adapter else None,
        "adapter_revision": adapter.revision if adapter else None,
        "architecture": model_type,
        "versions": {**v, "python": platform.python_version()},
        "pinned": {"triton_release": TRITON_RELEASE, "tensorrt": TENSORRT_VERSION},
        "gpu": gpu,
        "stage_seconds": dict(progress.timings),
        "total_seconds": round(time.time() - started, 3),
        "sizes": {"source_bytes": source.size_bytes or _size(model_dir), "onnx_bytes": _size(onnx_file.parent),
                  "engine_bytes": _size(engine_file.parent)},
        "check": check_report,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def model_info(inputs: EngineInputs, model_type: str, spec, model_dir: Path, config: dict, model) -> ModelInfo:
    from . import architectures as arch
    from .export import io_description

    bos, eos_ids, pad = arch.special_token_ids(model_dir, config)
    kv_type = "TYPE_FP16" if inputs.backend == "onnxruntime" and inputs.precision == "fp16" else None
    ins, outs = io_description(spec, kv_type)
    info: dict[str, Any] = {
        "format": MODEL_INFO_FORMAT,
        "task": inputs.task,
        "backend": inputs.backend,
        "precision": inputs.precision,
        "architecture": model_type,
        "engine_file": ENGINE_FILES[inputs.backend],
        "max_batch_size": inputs.max_batch_size,
        "max_sequence_length": inputs.max_sequence_length,
        "inputs": ins,
        "outputs": outs,
        "tokenizer_dir": TOKENIZER_DIR,
        "bos_token_id": bos,
        "eos_token_ids": eos_ids,
        "pad_token_id": pad,
        "hidden_size": int(model.config.get_text_config().hidden_size),
    }
    if inputs.task == "text-generation":
        info["kv_cache"] = {"num_layers": spec.num_layers, "past_inputs": spec.past_names(),
                            "present_outputs": spec.present_names()}
        info["vocab_size"] = spec.vocab_size
    if inputs.task == "text-classification":
        id2label = model.config.id2label
        info["labels"] = [str(id2label[i]) for i in range(len(id2label))]
    return ModelInfo.model_validate(info)


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 16 << 20
    except OSError:
        return False


def _np_dtype(torch_dtype):
    import numpy as np
    import torch

    return {torch.float32: np.float32, torch.float16: np.float16}.get(torch_dtype, np.float32)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-").lower()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _quiet_libraries() -> None:
    """No tqdm bars or per-weight chatter in `kubectl logs`: our stage lines say what happens."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def default_request(**kwargs) -> BuildRequest:
    """A request from CLI-style arguments (the spec key is the operator's: same inputs, same key)."""
    cache_dir = default_cache_dir(kwargs.pop("cache_dir", None))
    output = kwargs.pop("output_dir", None)
    model_name = kwargs.pop("model_name", "deepseek")
    runtime = kwargs.pop("runtime", "triton")
    inputs = EngineInputs(toolchain=default_toolchain(kwargs["backend"], kwargs["precision"]), **kwargs)
    return BuildRequest(inputs=inputs, cache_dir=cache_dir, output_dir=Path(output) if output else None,
                        model_name=model_name, runtime=runtime)
