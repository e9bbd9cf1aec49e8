"""Streamed text from token ids, decoding a few tokens per step rather than the whole completion.

Decoding ``generated`` whole at every token costs O(n) per token, O(n^2) per completion: at a few
thousand tokens that is milliseconds of the decode loop's time per step.  :class:`IncrementalText`
decodes only the tokens since the last piece it handed out, with the tokens of that piece before
them as context (so a byte-level or SentencePiece decoder sees the same neighbours it would in the
whole), and holds back text that ends inside a multi-byte character until the rest arrives.
"""

from __future__ import annotations

from typing import Sequence

#: What a byte-level decoder writes for bytes that do not (yet) make a whole character.
INCOMPLETE = "\ufffd"


class IncrementalText:
    """The new text of a growing list of token ids; the pieces joined equal decoding the ids whole."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._prefix = 0  # ids[_prefix:_read] decode to the text already handed out, ended by the last piece
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _new(self, ids: Sequence[int]) -> tuple[str, str]:
        before = self._decode(ids[self._prefix:self._read]) if self._read > self._prefix else ""
        return before, self._decode(ids[self._prefix:])

    def step(self, ids: Sequence[int]) -> str:
        """The text that ``ids`` add to what was handed out, or "" while it would end inside a character."""
        before, now = self._new(ids)
        if len(now) <= len(before) or now.endswith(INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return now[len(before):]

    def rest(self, ids: Sequence[int]) -> str:
        """Everything not handed out yet, held-back bytes included (the end of the completion)."""
        before, now = self._new(ids)
        self._prefix = self._read = len(ids)
        return now[len(before):]
