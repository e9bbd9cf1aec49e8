"""ONNX export: a wrapper per task with the tensor names and shapes of ENGINE_FORMAT.md.

The wrappers take plain tensors only (so the legacy TorchScript exporter can trace them).
Text generation exports the serving step (``deepseek_model_repository.serving.torch_step``):
the cache rows go in, the logits and the new positions' keys and values come out, and the
cache is read in place by a two-part attention.  The encoder wrappers build their own 4-D
additive attention mask (causal plus left padding), which transformers passes on as it is.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepseek_contract import engine_io

from .errors import BuildError

OPSET = 17


def padding_causal_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, P+T] additive mask: query t (absolute P+t) sees key s when s <= P+t and the key is not padding."""
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_length, device=attention_mask.device) + (total - query_length)
    causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
    # A padding query sees only itself: no row is fully masked, so padding stays finite in every precision.
    itself = key_pos[None, :] == query_pos[:, None]
    allowed = causal[None, None, :, :] & ((attention_mask[:, None, None, :] > 0) | itself[None, None, :, :])
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids of left-padded rows: cumsum(mask) - 1, clipped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def base_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a task model (``model.model`` for every supported architecture)."""
    return getattr(model, model.base_model_prefix, model)


class ClassificationWrapper(nn.Module):
    """(input_ids, attention_mask) -> logits of the last real token (prompts are left-padded)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        base = base_model_of(self.model)
        dtype = self.model.score.weight.dtype
        mask = padding_causal_mask(attention_mask, input_ids.shape[1], dtype)
        hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(attention_mask),
                      use_cache=False).last_hidden_state
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (steps[None, :] * (attention_mask > 0).long()).argmax(-1)  # [B]
        index = last[:, None, None].expand(-1, 1, hidden.shape[-1])
        pooled = hidden.gather(1, index)[:, 0, :]
        return self.model.score(pooled).float()


class FeatureExtractionWrapper(nn.Module):
    """(input_ids, attention_mask) -> embedding: the mean of the last hidden state over the mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        base = base_model_of(self.model)
        dtype = base.get_input_embeddings().weight.dtype
        mask = padding_causal_mask(attention_mask, input_ids.shape[1], dtype)
        hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(attention_mask),
                      use_cache=False).last_hidden_state.float()
        weights = (attention_mask > 0).float()[:, :, None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclass
class KvLayout:
    """Shapes of one layer's cache: heads and head dims of its keys and of its values (MLA: the latents)."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int


@dataclass
class ExportSpec:
    """What the ONNX graph looks like: names, dynamic axes, the wrapper, and how to make sample inputs."""

    task: str
    wrapper: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    kv: list[KvLayout] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    vocab_size: int = 0
    #: Width of the single output of the encoder tasks (labels or hidden size).
    out_width: int = -1

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    def past_names(self) -> list[str]:
        return engine_io.past_names(self.num_layers)

    def present_names(self) -> list[str]:
        return engine_io.present_names(self.num_layers)


def kv_layout(model: nn.Module) -> list[KvLayout]:
    """The cache shapes, read from one real forward pass (MLA keys and values have different head dims)."""
    from deepseek_model_repository.serving.torch_step import cache_shapes

    return [KvLayout(k_heads, k_dim, v_heads, v_dim) for (k_heads, k_dim), (v_heads, v_dim) in cache_shapes(model)]


def export_spec(model: nn.Module, task: str) -> ExportSpec:
    """The wrapper, names and dynamic axes for ``task``."""
    dtype = model.get_input_embeddings().weight.dtype
    if task == "text-generation":
        from deepseek_model_repository.serving.torch_step import TextGenerationStep

        kv = kv_layout(model)
        spec = ExportSpec(task, TextGenerationStep(model, len(kv)), [], [], {}, kv=kv, dtype=dtype,
                          vocab_size=model.config.get_text_config().vocab_size)
        spec.input_names = [*engine_io.STEP_INPUTS, *spec.past_names()]
        spec.output_names = [engine_io.LOGITS, *spec.present_names()]
        axes = {name: {0: "batch", 1: "new_tokens"} for name in ("input_ids", "position_ids", "token_mask")}
        axes["cache_lengths"] = {0: "batch"}
        axes[engine_io.LOGITS] = {0: "batch"}
        for name in spec.past_names():
            axes[name] = {0: "batch", 2: "capacity"}
        for name in spec.present_names():
            axes[name] = {0: "batch", 2: "new_tokens"}
        spec.dynamic_axes = axes
        return spec
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    if task == "text-classification":
        axes["logits"] = {0: "batch"}
        return ExportSpec(task, ClassificationWrapper(model), ["input_ids", "attention_mask"], ["logits"], axes,
                          dtype=dtype, out_width=model.config.num_labels)
    if task == "feature-extraction":
        axes["embedding"] = {0: "batch"}
        return ExportSpec(task, FeatureExtractionWrapper(model), ["input_ids", "attention_mask"], ["embedding"], axes,
                          dtype=dtype, out_width=model.config.get_text_config().hidden_size)
    raise BuildError(f"unsupported task {task!r}")


def sample_inputs(spec: ExportSpec, batch: int, new_tokens: int, past: int, vocab: int, *, pad: int = 0,
                  generator: torch.Generator | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random inputs: ``batch`` rows, the last row padded by ``pad`` tokens.

    Encoder tasks are left-padded.  Text generation gets the step format: rows right-padded, a cache
    of capacity ``past + 2`` whose rows hold ``past``, ``past - 1``, ... valid positions.
    """
    g = generator
    ids = torch.randint(3, vocab, (batch, new_tokens), generator=g)
    mask = torch.ones((batch, new_tokens), dtype=torch.long)
    if spec.task != "text-generation":
        if pad:
            mask[-1, :pad] = 0
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if pad:
        mask[-1, new_tokens - pad:] = 0
    capacity = past + 2
    lengths = torch.tensor([max(0, past - row) for row in range(batch)], dtype=torch.long)
    inputs = {"input_ids": ids.to(device), "position_ids": (lengths[:, None] + torch.arange(new_tokens)).to(device),
              "token_mask": mask.to(device), "cache_lengths": lengths.to(device)}
    for i, layout in enumerate(spec.kv):
        k = torch.randn((batch, layout.key_heads, capacity, layout.key_dim), generator=g) * 0.5
        v = torch.randn((batch, layout.value_heads, capacity, layout.value_dim), generator=g) * 0.5
        inputs[f"past_key_values.{i}.key"] = k.to(device=device, dtype=spec.dtype)
        inputs[f"past_key_values.{i}.value"] = v.to(device=device, dtype=spec.dtype)
    return inputs


def _real_rotary_forward(self, x, position_ids):
    """DeepSeek-V2's rotary embedding as (cos, sin) pairs instead of complex numbers (ONNX has no complex)."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling  # [B, T, D/2, 2]


def _real_apply_rotary_emb(xq, xk, freqs):
    """The complex product of DeepSeek-V2's apply_rotary_emb written on real (even, odd) pairs."""
    cos, sin = freqs[..., 0].unsqueeze(1), freqs[..., 1].unsqueeze(1)  # [B, 1, T, D/2]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def export_friendly(model: nn.Module):
    """Swap code the ONNX exporter cannot trace for equivalent real-valued code, for the export only.

    DeepSeek-V2 computes its rotary embedding with complex tensors (torch.polar, view_as_complex). The
    numerical check runs after this context has restored the original code, so it compares the engine
    with the unmodified model.
    """
    if getattr(model.config, "model_type", "") != "deepseek_v2":
        yield
        return
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2

    rotaries = [m for m in model.modules() if isinstance(m, v2.DeepseekV2RotaryEmbedding)]
    original_apply = v2.apply_rotary_emb
    for m in rotaries:
        m.forward = _real_rotary_forward.__get__(m)
    v2.apply_rotary_emb = _real_apply_rotary_emb
    try:
        yield
    finally:
        v2.apply_rotary_emb = original_apply
        for m in rotaries:
            del m.forward


def export_onnx(spec: ExportSpec, out_file: Path, vocab: int, device: str = "cpu") -> None:
    """Trace the wrapper with the legacy exporter into ``out_file`` (weights beside it when over 2 GB)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    # Distinct sizes for batch, new tokens and past, none of them 1, so no axis gets specialised.
    inputs = sample_inputs(spec, batch=2, new_tokens=3, past=5 if spec.task == "text-generation" else 0,
                           vocab=vocab, pad=1, generator=g, device=device)
    args = tuple(inputs[name] for name in spec.input_names)
    with warnings.catch_warnings(), torch.no_grad(), export_friendly(spec.wrapper.model), \
            _step_attention(spec):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                spec.wrapper,
                args,
                str(out_file),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        except (RuntimeError, TypeError, ValueError) as exc:  # the exporter's errors carry a whole IR dump
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BuildError(f"ONNX export of the {spec.task} model failed: {first}") from None
    _consolidate_external_data(out_file)


def _step_attention(spec: ExportSpec):
    """The text-generation step's two-part attention, for the export only."""
    if spec.task != "text-generation":
        return contextlib.nullcontext()
    from deepseek_model_repository.serving.torch_step import split_cache_attention_of

    return split_cache_attention_of(spec.wrapper.model)


def _consolidate_external_data(out_file: Path) -> None:
    """Large models: the exporter scatters weights into one file per tensor; gather them into model.onnx.data."""
    folder = out_file.parent
    strays = [p for p in folder.iterdir() if p != out_file]
    if not strays:
        return
    import onnx

    model = onnx.load(str(out_file), load_external_data=True)
    for p in strays:
        p.unlink()
    onnx.save_model(model, str(out_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out_file.name + ".data", size_threshold=1024)


def io_description(spec: ExportSpec, kv_type: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """model-info.json's inputs/outputs: Triton data types and dims without the batch dimension.

    ``kv_type`` is the engine's KV-cache type when it differs from the export's (an fp16 ONNX Runtime engine
    converted from the fp32 export).
    """
    kv_type = kv_type or {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16",
                          torch.bfloat16: "TYPE_BF16"}[spec.dtype]
    if spec.task == "text-generation":
        inputs = [{"name": n, "data_type": "TYPE_INT64", "dims": [-1]} for n in ("input_ids", "position_ids", "token_mask")]
        inputs.append({"name": "cache_lengths", "data_type": "TYPE_INT64", "dims": []})
        outputs = [{"name": engine_io.LOGITS, "data_type": "TYPE_FP32", "dims": [spec.vocab_size]}]
        for i, layout in enumerate(spec.kv):
            inputs.append({"name": f"past_key_values.{i}.key", "data_type": kv_type,
                           "dims": [layout.key_heads, -1, layout.key_dim]})
            inputs.append({"name": f"past_key_values.{i}.value", "data_type": kv_type,
                           "dims": [layout.value_heads, -1, layout.value_dim]})
            outputs.append({"name": f"present.{i}.key", "data_type": kv_type,
                            "dims": [layout.key_heads, -1, layout.key_dim]})
            outputs.append({"name": f"present.{i}.value", "data_type": kv_type,
                            "dims": [layout.value_heads, -1, layout.value_dim]})
        return inputs, outputs
    inputs = [{"name": n, "data_type": "TYPE_INT64", "dims": [-1]} for n in ("input_ids", "attention_mask")]
    return inputs, [{"name": spec.output_names[0], "data_type": "TYPE_FP32", "dims": [spec.out_width]}]
