"""Streamed text decoded a few tokens at a time joins to the whole completion's text (DeepSeek's real tokenizer)."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from deepseek_builder.tiny import tokenizer_files_dir
from deepseek_model_repository.serving.detokenize import INCOMPLETE, IncrementalText, StopText, StreamedText


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


def paced(tokenizer, ids, interval):
    text, pieces = StreamedText(tokenizer, interval), []
    for n in range(1, len(ids) + 1):
        piece = text.step(ids[:n])
        if piece:
            pieces.append((n, piece))
    return pieces, text.rest(ids)


@pytest.mark.parametrize("interval", [1, 3, 8])
def test_a_paced_stream_hands_out_the_first_token_at_once_then_one_piece_per_interval(tokenizer, interval):
    text = "the quick brown fox jumps over the lazy dog, and then it runs back across the field again"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces, rest = paced(tokenizer, ids, interval)
    assert "".join(p for _, p in pieces) + rest == text
    at = [n for n, _ in pieces]
    assert at[0] == 1, "the first token's text is not delayed"
    assert all(b - a == interval for a, b in zip(at, at[1:])), at  # ASCII words: no piece is held back
    assert len(pieces) == 1 + (len(ids) - 1) // interval


@pytest.mark.parametrize("seed", range(3))
def test_a_paced_stream_of_random_ids_joins_to_the_whole_text(tokenizer, seed):
    """Held-back characters are tried again at the next token, and the pieces still join to the whole."""
    ids = [int(i) for i in np.random.default_rng(seed).integers(0, tokenizer.get_vocab_size(), 200)]
    pieces, rest = paced(tokenizer, ids, 4)
    assert "".join(p for _, p in pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True)
    at = [n for n, _ in pieces]
    assert all(b - a >= 4 for a, b in zip(at, at[1:]))
    assert len(pieces) <= 1 + (len(ids) - 1) // 4


def test_a_stream_interval_below_one_token_is_refused(tokenizer):
    with pytest.raises(ValueError, match="at least 1 token"):
        StreamedText(tokenizer, 0)


def stopped_at(tokenizer, text, stops, interval=None):
    """Feed ``text``'s tokens one by one, as the scheduler does, until a stop string ends them: (the token count
    fed, the pieces handed out, the rest, the cut text)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stopper = StopText(tokenizer, stops) if interval is None else StreamedText(tokenizer, interval, stops=stops)
    pieces = []
    for n in range(1, len(ids) + 1):
        pieces.append(stopper.step(ids[:n]))
        if stopper.stopped:
            break
    rest = stopper.rest(ids[:n])
    return n, [p for p in pieces if p], rest, getattr(stopper, "text", None)


@pytest.mark.parametrize("stops", [["lazy"], ["z"], ["jumps over", "the lazy"], ["lazy dog", "over the l"]])
def test_text_stops_before_the_first_stop_string_and_never_hands_one_out(tokenizer, stops):
    text = "the quick brown fox jumps over the lazy dog, and then it runs back across the field again"
    first = min(text.find(s) for s in stops)
    n, pieces, rest, cut = stopped_at(tokenizer, text, stops)
    assert "".join(pieces) + rest == cut == text[:first]
    assert not any(s in "".join(pieces) + rest for s in stops)
    # It stops at the token that completes the stop string, not later.
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert any(s in tokenizer.decode(ids[:n]) for s in stops) and not any(
        s in tokenizer.decode(ids[:n - 1]) for s in stops)


def test_an_end_that_could_begin_a_stop_string_is_held_back_then_handed_out(tokenizer):
    """"the lazy" begins "the lazy cat", so it waits until the text goes another way, or to the end."""
    text = "the lazy dog and the lazy"
    n, pieces, rest, cut = stopped_at(tokenizer, text, ["the lazy cat"])
    assert cut == text and "".join(pieces) + rest == text
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stopper = StopText(tokenizer, ["the lazy cat"])
    handed = [stopper.step(ids[:k]) for k in range(1, len(ids) + 1)]
    assert "".join(handed) == "the lazy dog and " and stopper.rest(ids) == "the lazy"
    assert handed[0] == "", "the first token could begin the stop string"


@pytest.mark.parametrize("interval", [1, 3])
def test_a_paced_stream_with_stop_strings_ends_at_the_stop_and_sends_the_text_before_it(tokenizer, interval):
    text = "the quick brown fox jumps over the lazy dog, and then it runs back across the field again"
    n, pieces, rest, _ = stopped_at(tokenizer, text, ["lazy"], interval)
    assert "".join(pieces) + rest == text[:text.find("lazy")]
    assert n < len(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("interval", [None, 1, 3])
def test_before_min_tokens_no_stop_string_ends_the_text_then_the_first_that_a_later_token_completes_does(
        tokenizer, interval):
    """vLLM's ``min_tokens``: a stop string is looked for only at the completion's ``min_tokens``-th token and after,
    in the text that token brings (so one wholly in the text before is passed over), the same whatever the stream's
    interval; streamed or not, the pieces join to the whole text cut there."""
    text = "the cat sat down, the dog ran off, and the cat ran after the dog"
    stops = ["cat", "dog ran"]
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    texts = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    cuts = set()
    for min_tokens in range(len(ids) + 2):
        want = text  # the reference: the first token from min_tokens on whose text completes a stop string
        for k in range(max(1, min_tokens), len(ids) + 1):
            ends = [at for stop in stops if (at := texts[k].find(stop, max(0, len(texts[k - 1]) - len(stop) + 1))) >= 0]
            if ends:
                want = texts[k][:min(ends)]
                break
        stopper = (StopText(tokenizer, stops, min_tokens=min_tokens) if interval is None
                   else StreamedText(tokenizer, interval, stops=stops, min_tokens=min_tokens))
        handed = ""
        for n in range(1, len(ids) + 1):
            handed += stopper.step(ids[:n])
            if stopper.stopped:
                break
        handed += stopper.rest(ids[:n])
        assert handed == want, (min_tokens, handed, want)
        cuts.add(want)
    # Every way it can end here: at the first "cat", at "dog ran", at the second "cat", at the end.
    assert cuts == {text[:text.find("cat")], text[:text.find("dog ran")], text[:text.rfind("cat")], text}


def test_stop_strings_must_be_non_empty(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        StopText(tokenizer, [""])


@pytest.mark.parametrize("seed", range(8))
def test_stop_text_equals_cutting_the_whole_text_and_hands_out_only_what_no_stop_string_can_take_back(
        tokenizer, seed):
    """Random stop strings, some from the text, some that only begin in it: what is handed out at each token is the
    text so far less its longest end that begins a stop string, and everything equals the whole text cut."""
    rng = np.random.default_rng(seed)
    text = "the quick brown fox jumps over the lazy dog; then the fox naps, and the dog barks at the quick fox"
    stops = []
    for _ in range(3):
        at = int(rng.integers(1, len(text) - 12))
        piece = text[at:at + int(rng.integers(2, 12))]
        stops.append(piece if rng.random() < 0.5 else piece[:-1] + "#")  # the second kind never completes
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stopper, handed = StopText(tokenizer, stops), ""
    for n in range(1, len(ids) + 1):
        handed += stopper.step(ids[:n])
        so_far = tokenizer.decode(ids[:n])
        cut = min([so_far.find(s) for s in stops if s in so_far], default=-1)
        if cut >= 0:
            assert stopper.stopped and handed == so_far[:cut]
            break
        held = max([k for k in range(1, len(so_far) + 1) for s in stops if s.startswith(so_far[-k:])], default=0)
        assert not stopper.stopped and handed == so_far[:len(so_far) - held]
    handed += stopper.rest(ids[:n])
    whole = tokenizer.decode(ids)
    first = min([whole.find(s) for s in stops if s in whole], default=len(whole))
    assert handed == stopper.text == whole[:first]


def test_a_run_of_special_tokens_is_left_out_of_what_each_step_decodes(tokenizer):
    """Under ``ignore_eos`` a model may choose its end-of-sentence token again and again: each step decodes the last
    piece's tokens and the new ones without those (the decoder skips them anyway), not the whole run so far."""
    class Counted:
        longest = 0

        def decode(self, ids, skip_special_tokens):
            Counted.longest = max(Counted.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        def get_added_tokens_decoder(self):
            return tokenizer.get_added_tokens_decoder()

    eos = tokenizer.token_to_id("<｜end▁of▁sentence｜>")
    ids = tokenizer.encode("hello there", add_special_tokens=False).ids + [eos] * 2000
    ids += tokenizer.encode(" and more", add_special_tokens=False).ids
    text, pieces = IncrementalText(Counted()), []
    for n in range(1, len(ids) + 1):
        pieces.append(text.step(ids[:n]))
    assert "".join(pieces) + text.rest(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert Counted.longest <= 4, Counted.longest
