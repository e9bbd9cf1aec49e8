"""The previous text-generation path ("run to completion"), rebuilt from git for the serving bench.

Before in-flight batching, ``NAME``/``NAME_stream`` ran each Triton dynamic batch to completion and
called a separate engine model (``NAME_engine``, ONNX Runtime in a Python model) once per token,
sending the whole KV cache back and forth through the Python backend's shared memory; its engine
(format 1) took the past keys and values and returned them concatenated with the new ones.

Nothing of that path is kept in the tree.  :func:`reconstruct` writes its files, as they were at
:data:`COMMIT`, into a temporary package (``build/export.py``, ``build/errors.py``,
``model_repository/{repository,config}.py`` and the ``generate`` and ``ort_engine`` Python models),
and :func:`export_engine` exports a format-1 engine of the same checkpoint with that code, so both
paths serve the same weights on the same local Triton.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

#: The last commit with the run-to-completion path.
COMMIT = "234236b"
PACKAGE = "legacy_serving_234236b"
FILES = {
    "build/export.py": "export.py",
    "build/errors.py": "errors.py",
    "model_repository/repository.py": "repository.py",
    "model_repository/config.py": "config.py",
    "model_repository/models/generate/model.py": "models/generate/model.py",
    "model_repository/models/ort_engine/model.py": "models/ort_engine/model.py",
}


class LegacyUnavailable(RuntimeError):
    """git, or the commit, is not there: baseline (a) is skipped with this message."""


def _git_show(repo: Path, path: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "show", f"{COMMIT}:{path}"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LegacyUnavailable(f"git is not available ({exc})") from None
    if out.returncode != 0:
        raise LegacyUnavailable(f"git show {COMMIT}:{path} failed: {out.stderr.strip()}")
    return out.stdout


def reconstruct(repo: Path, workdir: Path) -> tuple[ModuleType, ModuleType]:
    """Write the old files into ``workdir/PACKAGE`` and import them: (export module, repository module)."""
    root = workdir / PACKAGE
    shutil.rmtree(root, ignore_errors=True)
    for source, target in FILES.items():
        text = _git_show(repo, source)
        if target == "repository.py":
            # The old writer read its Python models from the installed package; read them from here.
            text = text.replace('resources.files("deepseek_model_repository.models")',
                                f'resources.files("{PACKAGE}.models")')
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in (root, root / "models"):
        (package / "__init__.py").touch()
    if str(workdir) not in sys.path:
        sys.path.insert(0, str(workdir))
    importlib.invalidate_caches()
    return importlib.import_module(f"{PACKAGE}.export"), importlib.import_module(f"{PACKAGE}.repository")


def export_engine(export: ModuleType, model_dir: Path, new_engine_dir: Path, out: Path,
                  max_batch_size: int, max_sequence_length: int) -> Path:
    """A format-1 engine directory of the checkpoint in ``model_dir``: the old export, fp32 ONNX Runtime.

    model-info.json takes the new engine's tokenizer and token ids, and the old inputs, outputs and
    ``kv_cache`` description (past_inputs / present_outputs).
    """
    import torch

    from deepseek_builder.architectures import load_model

    if (out / "model-info.json").is_file():
        return out
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(0)
    model = load_model(model_dir, "text-generation")
    spec = export.export_spec(model, "text-generation")
    vocab = int(model.config.get_text_config().vocab_size)
    export.export_onnx(spec, staging / "engine" / "model.onnx", vocab)
    ins, outs = export.io_description(spec)
    new_info = json.loads((new_engine_dir / "model-info.json").read_text())
    tokenizer_dir = new_info.get("tokenizer_dir", "tokenizer")
    shutil.copytree(new_engine_dir / tokenizer_dir, staging / "tokenizer")
    info: dict[str, Any] = {
        "format": 1,
        "task": "text-generation",
        "backend": "onnxruntime",
        "precision": "fp32",
        "architecture": new_info.get("architecture"),
        "engine_file": "engine/model.onnx",
        "max_batch_size": max_batch_size,
        "max_sequence_length": max_sequence_length,
        "inputs": ins,
        "outputs": outs,
        "tokenizer_dir": "tokenizer",
        "bos_token_id": new_info.get("bos_token_id"),
        "eos_token_ids": new_info.get("eos_token_ids", []),
        "pad_token_id": new_info.get("pad_token_id"),
        "hidden_size": new_info.get("hidden_size"),
        "kv_cache": {"num_layers": spec.num_layers, "past_inputs": spec.past_names(),
                     "present_outputs": spec.present_names()},
        "vocab_size": vocab,
    }
    (staging / "model-info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
