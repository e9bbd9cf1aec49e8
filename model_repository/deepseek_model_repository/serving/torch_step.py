"""The text-generation step in PyTorch: what the ONNX export traces and what the PyTorch runner runs.

``TextGenerationStep`` wraps a transformers causal LM so one call takes the new tokens and the
cache rows (``deepseek_contract.engine_io``) and returns the logits of each row's last new token
and the keys and values of the new positions only.  The cache is read where it lies, never
concatenated or copied: attention is computed in two parts, over the cached positions and over
the new ones, and the two softmax halves share one normaliser.

transformers' attention modules call ``past_key_values.update(k, v, layer)`` and then an
attention function chosen by ``config._attn_implementation``.  Here ``update`` records the new
keys and values (the step's outputs) and returns them unchanged, and the registered attention
function :func:`split_cache_attention` finds the layer's cached rows in the step's context.
MLA models (DeepSeek-V2/V3) cache compressed latents; the cached part of their attention is
computed on the latents with the up-projections absorbed into the query and the output (as
DeepSeek's own inference does), so the cache is never expanded into per-head keys and values.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import nn

ATTENTION_NAME = "deepseek_split_cache"

_context = threading.local()


class StepCache:
    """The ``past_key_values`` a model sees during one step: it records the new keys and values."""

    is_compileable = False

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], cache_lengths: torch.Tensor):
        self.past = past
        self.cache_lengths = cache_lengths
        self.present: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(past)
        #: The cached positions' additive mask: made by the first layer, shared by the others (every layer's cache
        #: rows have the same capacity).
        self.past_mask: Optional[torch.Tensor] = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.present[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:  # noqa: ARG002 - positions come as position_ids
        return 0

    def __len__(self) -> int:
        return len(self.past)


def _masks(cache: "StepCache", attention_mask, capacity: int, dtype, device):
    """Additive masks: cached positions past each row's length [B, 1, 1, C], and the new tokens' [B, 1, 1, T, T].

    Made once per step and shared by the layers, from kernels alone: a tensor made from a host value would be a
    copy that waits for the device's queued work, once per layer."""
    if cache.past_mask is None or cache.past_mask.dtype != dtype:
        hidden = torch.arange(capacity, device=device)[None, :] >= cache.cache_lengths[:, None]  # [B, C]
        past = torch.zeros_like(hidden, dtype=dtype).masked_fill(hidden, torch.finfo(dtype).min)
        cache.past_mask = past[:, None, None, :]
    return cache.past_mask, attention_mask[:, :, None, :, :].to(dtype)


def split_cache_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of the new tokens over the cached positions and over themselves, without joining the cache.

    ``query`` [B, H, T, Dk]; ``key``/``value`` the new tokens' [B, Hkv, T, D]; ``attention_mask`` the
    additive [B, 1, T, T] mask among the new tokens.  Cached positions at or past a row's
    ``cache_lengths`` are masked out.  MLA modules attend to their cached latents directly
    (:func:`_latent_scores`), so the cache is never expanded into per-head keys and values.
    """
    cache: StepCache = _context.cache
    past_key, past_value = cache.past[module.layer_idx]
    batch, heads, steps, _ = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # Grouped-query attention without repeating anything: [B, Hkv, G*T, D] against [B, Hkv, C, D].
    q = query.reshape(batch, kv_heads, groups * steps, query.shape[-1])
    capacity = past_key.shape[2]
    latent = _is_mla(module)
    if latent:
        q_latent, scores_past = _latent_scores(module, query, past_key, past_value, scaling)  # [B, H, T, C]
        scores_past = scores_past.reshape(batch, kv_heads, groups * steps, capacity)
    else:
        scores_past = torch.matmul(q, past_key.transpose(2, 3)) * scaling  # [B, Hkv, G*T, C]
    scores_new = torch.matmul(q, key.transpose(2, 3)) * scaling  # [B, Hkv, G*T, T]
    past_mask, new_mask = _masks(cache, attention_mask, capacity, scores_past.dtype, query.device)
    scores_past = scores_past + past_mask
    scores_new = (scores_new.reshape(batch, kv_heads, groups, steps, steps) + new_mask).reshape(
        batch, kv_heads, groups * steps, steps)
    weights = torch.softmax(torch.cat([scores_past, scores_new], dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    out_new = torch.matmul(weights[..., capacity:], value)  # [B, Hkv, G*T, Dv]
    if latent:
        out_past = _latent_values(module, weights[..., :capacity].reshape(batch, heads, steps, capacity), past_key)
        out_past = out_past.reshape(batch, kv_heads, groups * steps, -1)
    else:
        out_past = torch.matmul(weights[..., :capacity], past_value)
    out = (out_past + out_new).reshape(batch, heads, steps, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _is_mla(module) -> bool:
    return hasattr(module, "expand_kv") and hasattr(module, "kv_b_proj") and hasattr(module, "qk_nope_head_dim")


def _mla_weights(module):
    """kv_b_proj split per head into the key part [H, Dn, R] and the value part [H, Dv, R]."""
    rank = module.kv_b_proj.weight.shape[1]
    w = module.kv_b_proj.weight.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim, rank)
    return w[:, : module.qk_nope_head_dim, :], w[:, module.qk_nope_head_dim:, :]


def _latent_scores(module, query, past_nope, past_rot, scaling):
    """MLA scores against the cached latents: the key projection is absorbed into the query.

    q·k = q_nope·(W_uk c) + q_rot·k_rot = (W_ukᵀ q_nope)·c + q_rot·k_rot, with c the cached latent
    [B, 1, C, R] and k_rot the cached shared rotary key [B, 1, C, Dr].
    """
    w_uk, _ = _mla_weights(module)
    q_nope = query[..., : module.qk_nope_head_dim]
    q_rot = query[..., module.qk_nope_head_dim:]
    q_latent = torch.matmul(q_nope, w_uk.to(query.dtype))  # [B, H, T, Dn] x [H, Dn, R] -> [B, H, T, R]
    scores = (torch.matmul(q_latent, past_nope.transpose(2, 3)) + torch.matmul(q_rot, past_rot.transpose(2, 3)))
    return q_latent, scores * scaling


def _latent_values(module, weights, past_nope):
    """MLA output over the cached latents: the value projection applied after the weighted sum."""
    _, w_uv = _mla_weights(module)
    mixed = torch.matmul(weights, past_nope)  # [B, H, T, C] x [B, 1, C, R] -> [B, H, T, R]
    return torch.matmul(mixed, w_uv.to(mixed.dtype).transpose(1, 2))  # [B, H, T, R] x [H, R, Dv]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, split_cache_attention)


def new_token_mask(token_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask among the new tokens: causal, padding keys hidden, a padding query sees itself."""
    steps = token_mask.shape[1]
    pos = torch.arange(steps, device=token_mask.device)
    causal = pos[None, :] <= pos[:, None]
    itself = pos[None, :] == pos[:, None]
    allowed = causal[None, None] & ((token_mask[:, None, None, :] > 0) | itself[None, None])
    return torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@contextlib.contextmanager
def split_cache_attention_of(model: nn.Module):
    """Route the model's attention through :func:`split_cache_attention` while the block runs."""
    _register()
    configs = {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)()) if c}
    saved = {key: getattr(c, "_attn_implementation", None) for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = saved[key]


class TextGenerationStep(nn.Module):
    """(input_ids, position_ids, token_mask, cache_lengths, past k/v ...) -> (logits, new k/v ...).

    Use it inside :func:`split_cache_attention_of` (the export and the PyTorch runner do).
    """

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, position_ids, token_mask, cache_lengths, *past):
        layers = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = StepCache(layers, cache_lengths)
        base = getattr(self.model, self.model.base_model_prefix)
        dtype = self.model.get_input_embeddings().weight.dtype
        previous = getattr(_context, "cache", None)
        _context.cache = cache
        try:
            hidden = base(
                input_ids=input_ids,
                attention_mask=new_token_mask(token_mask, dtype),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        finally:
            _context.cache = previous
        last = (token_mask.sum(dim=1) - 1).clamp(min=0)  # [B]
        index = last[:, None, None].expand(-1, 1, hidden.shape[-1])
        logits = self.model.lm_head(hidden.gather(1, index)[:, 0, :]).float()
        present = []
        for keys_values in cache.present:
            present += list(keys_values)
        return (logits, *present)


def cache_shapes(model: nn.Module) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, ((heads, dim) of the key, (heads, dim) of the value) as the model caches them."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=True)
    return [((layer.keys.shape[1], layer.keys.shape[-1]), (layer.values.shape[1], layer.values.shape[-1]))
            for layer in out.past_key_values.layers]
