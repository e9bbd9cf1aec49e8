"""Which checkpoints the builder accepts, and loading them (plus a LoRA adapter) for a task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from deepseek_contract.vocabulary import ARCHITECTURE_FAMILIES as SUPPORTED

from .errors import BuildError


def read_config(model_dir: Path, what: str = "source") -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{what} {model_dir} has no config.json; is it a Hugging Face checkpoint folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None


def check_architecture(config: dict, where: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise BuildError(f"{where}: architecture {model_type!r} is not supported; supported: {names}")
    return model_type


def max_positions(config: dict) -> Optional[int]:
    """The longest sequence the model was made for (``max_position_embeddings``), if its config says."""
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_sequence_length(config: dict, max_sequence_length: int, where: str) -> None:
    """Refuse an engine longer than the model's positions: beyond them the model's output is undefined."""
    limit = max_positions(config)
    if limit is not None and max_sequence_length > limit:
        raise BuildError(f"{where}: engine.maxSequenceLength (--max-seq-len) {max_sequence_length} is above the "
                         f"model's max_position_embeddings {limit}; set it to {limit} or less")


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files; refuses a folder without any (a cheap look, no file is opened)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if list(model_dir.glob("*.bin")):
            raise BuildError(f"{model_dir}: only PyTorch .bin weights found; the builder loads safetensors only "
                             "(convert them with transformers' save_pretrained)")
        raise BuildError(f"{model_dir}: no *.safetensors weights found")
    return files


def check_weights(model_dir: Path) -> None:
    """Open every safetensors file's header, so a truncated or corrupt file fails with its name."""
    from safetensors import safe_open

    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
            raise BuildError(f"{file}: corrupt or truncated safetensors file ({exc}); re-download or re-save it") from None


def _dtype(precision: str, backend: str):
    import torch

    # ONNX Runtime engines are exported in fp32 and converted; TensorRT's strongly typed networks take the
    # precision from the ONNX graph, so the export itself is fp16/bf16.
    if backend == "tensorrt" and precision in ("fp16", "bf16"):
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.float32


def load_model(model_dir: Path, task: str, *, precision: str = "fp32", backend: str = "onnxruntime",
               device: str = "cpu"):
    """The model for ``task`` in eval mode, eager attention, export-friendly MoE."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    if task == "text-classification" and not getattr(config, "id2label", None):
        raise BuildError(f"{model_dir}: text-classification needs id2label in config.json")
    cls = {
        "text-generation": transformers.AutoModelForCausalLM,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]
    try:
        model = cls.from_pretrained(str(model_dir), dtype=_dtype(precision, backend), attn_implementation="eager")
    except (OSError, ValueError, RuntimeError) as exc:
        raise BuildError(f"{model_dir}: cannot load the checkpoint for {task}: {exc}") from None
    # The default MoE dispatch does not trace to ONNX; the batched-matmul one does and is numerically equal.
    if getattr(model.config, "model_type", "") in ("deepseek_v3", "deepseek_v2"):
        model.config._experts_implementation = "batched_mm"
    return model.to(device).eval()


def adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"adapter {adapter_dir} has no adapter_config.json; is it a PEFT LoRA adapter?") from None
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path}: not valid JSON ({exc})") from None


def merge_adapter(model, adapter_dir: Path, base_arch: str):
    """Apply a PEFT LoRA adapter and merge it into the weights; refuse one made for another model."""
    import torch
    from peft import PeftModel

    cfg = adapter_config(adapter_dir)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BuildError(f"adapter {adapter_dir}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    missing = [t for t in targets if t not in modules and t != "all-linear"]
    if missing:
        raise BuildError(f"adapter {adapter_dir} targets modules {missing} that a {base_arch} model does not have; "
                         "it was trained for another architecture")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), torch_device="cpu"
                                               if next(model.parameters()).device.type == "cpu" else None)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise BuildError(f"adapter {adapter_dir} does not fit this {base_arch} model (it was trained for another "
                         f"architecture or size): {' '.join(lines[:2])[:400]}") from None
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    return merged.eval()


def tokenizer_files(model_dir: Path) -> list[Path]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "generation_config.json", "vocab.json", "merges.txt")
    return [model_dir / n for n in names if (model_dir / n).is_file()]


def special_token_ids(model_dir: Path, config: dict) -> tuple[Optional[int], list[int], Optional[int]]:
    """bos, eos ids (generation_config first, then config.json) and the pad id (eos when none)."""
    gen = {}
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass

    def pick(key):
        value = gen.get(key)
        return config.get(key) if value is None else value

    bos = pick("bos_token_id")
    eos = pick("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = pick("pad_token_id")
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return bos, eos_ids, pad
