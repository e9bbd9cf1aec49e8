"""Streamed text from token ids, decoding a few tokens per step rather than the whole completion.

Decoding ``generated`` whole at every token costs O(n) per token, O(n^2) per completion: at a few
thousand tokens that is milliseconds of the decode loop's time per step.  :class:`IncrementalText`
decodes only the tokens since the last piece it handed out, with the tokens of that piece before
them as context (so a byte-level or SentencePiece decoder sees the same neighbours it would in the
whole), and holds back text that ends inside a multi-byte character until the rest arrives.

:class:`StreamedText` paces a stream's pieces: one every ``interval`` tokens (``serving.streamInterval``),
the first at once, whatever is left at the end.  Each piece is one response, which costs a round trip to
Triton's process, Triton's frontend and the client's parsing, whatever its length.
"""

from __future__ import annotations

from typing import Sequence

#: What a byte-level decoder writes for bytes that do not (yet) make a whole character.
INCOMPLETE = "\ufffd"
#: Tokens per streamed response (``serving.streamInterval``): 1 sends each token's text as it is made.
DEFAULT_STREAM_INTERVAL = 1


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


class StreamedText:
    """The pieces of a stream: the first as soon as there is text, then one every ``interval`` tokens.

    ``interval`` 1 hands out every token's text.  A piece held back (it ended inside a character) is
    tried again at the next token, not ``interval`` tokens later.
    """

    def __init__(self, tokenizer, interval: int = DEFAULT_STREAM_INTERVAL, skip_special_tokens: bool = True):
        if interval < 1:
            raise ValueError(f"the stream interval must be at least 1 token, got {interval}")
        self.text = IncrementalText(tokenizer, skip_special_tokens)
        self.interval = interval
        self._handed = 0  # tokens covered by the pieces handed out
        self._pieces = 0

    def step(self, ids: Sequence[int]) -> str:
        """The next piece, or "" when none is due at this token."""
        if self._pieces and len(ids) - self._handed < self.interval:
            return ""
        piece = self.text.step(ids)
        if piece:
            self._handed = len(ids)
            self._pieces += 1
        return piece

    def rest(self, ids: Sequence[int]) -> str:
        """Everything not handed out yet (the end of the completion)."""
        self._handed = len(ids)
        return self.text.rest(ids)
