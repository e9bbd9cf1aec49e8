"""Streamed text decoded a few tokens at a time joins to the whole completion's text (DeepSeek's real tokenizer)."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from deepseek_builder.tiny import tokenizer_files_dir
from deepseek_model_repository.serving.detokenize import INCOMPLETE, IncrementalText


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(tokenizer_files_dir() / "tokenizer.json"))


def stream(tokenizer, ids):
    text, pieces = IncrementalText(tokenizer), []
    for n in range(1, len(ids) + 1):
        pieces.append(text.step(ids[:n]))
    return pieces, text.rest(ids)


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_stream_to_the_whole_text(tokenizer, seed):
    """Random ids (as the tiny random-weight models make), special tokens and split characters among them."""
    ids = [int(i) for i in np.random.default_rng(seed).integers(0, tokenizer.get_vocab_size(), 300)]
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(p.endswith(INCOMPLETE) for p in pieces)


def test_a_character_split_over_tokens_is_held_back_until_whole(tokenizer):
    text = "naïve 日本語 🙂 café, and 中文"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) + rest == text and rest == ""
    assert INCOMPLETE not in "".join(pieces)
    assert sum(1 for p in pieces if p) > 5, "text arrives piece by piece"
