"""The text-generation engine's step contract (engine format 2, model_repository/ENGINE_FORMAT.md).

One call of the engine advances B rows of the KV cache by T new tokens each:

inputs
  ``input_ids``      [B, T] int64  the new tokens, right-padded
  ``position_ids``   [B, T] int64  their absolute positions (the row's cache length + t)
  ``token_mask``     [B, T] int64  1 for a real new token, 0 for padding
  ``cache_lengths``  [B]    int64  how many cached positions of each row are valid
  ``past_key_values.{i}.key|value`` [B, H, C, D]  the cache rows themselves, C = the slots' capacity
outputs
  ``logits``         [B, V] float32 at each row's last real new token
  ``present.{i}.key|value`` [B, H, T, D]  keys and values of the new positions only

The cache is never returned: the runner writes the new positions into it in place, so a step's
traffic is the new tokens, not the context.  For MLA models (DeepSeek-V2/V3) ``key`` and
``value`` are the compressed latents (``kv_nope`` and the shared rotary key) that transformers caches.
"""

from __future__ import annotations

STEP_INPUTS = ("input_ids", "position_ids", "token_mask", "cache_lengths")
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
