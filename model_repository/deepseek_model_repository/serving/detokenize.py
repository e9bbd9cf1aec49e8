"""Streamed text from token ids, decoding a few tokens per step rather than the whole completion.

Decoding ``generated`` whole at every token costs O(n) per token, O(n^2) per completion: at a few
thousand tokens that is milliseconds of the decode loop's time per step.  :class:`IncrementalText`
decodes only the tokens since the last piece it handed out, with the tokens of that piece before
them as context (so a byte-level or SentencePiece decoder sees the same neighbours it would in the
whole), and holds back text that ends inside a multi-byte character until the rest arrives.

:class:`StopText` cuts a completion at the first of a request's stop strings: the text it hands out never
holds one, and holds back, until the completion ends, an end that could be the beginning of one.

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
    """The new text of a growing list of token ids; the pieces joined equal decoding the ids whole.

    Special tokens, which the decoder skips (``skip_special_tokens``), are left out of what it decodes, so a run
    of them (an end-of-sentence token again and again under ``ignore_eos``) costs nothing at each step."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        self._context: list[int] = []  # the tokens of the last piece handed out: the decoder's left context
        self._context_text = ""  # what they decode to
        self._pending: list[int] = []  # the tokens since, not handed out yet
        self._read = 0  # ids taken into _pending

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _new(self, ids: Sequence[int]) -> str:
        """What the context and the pending tokens decode to, once the ids since the last look are pending."""
        self._pending.extend(t for t in ids[self._read:] if t not in self._skipped)
        self._read = len(ids)
        return self._decode(self._context + self._pending) if self._pending else self._context_text

    def step(self, ids: Sequence[int]) -> str:
        """The text that ``ids`` add to what was handed out, or "" while it would end inside a character."""
        before, now = self._context_text, self._new(ids)
        if len(now) <= len(before) or now.endswith(INCOMPLETE):
            return ""
        self._context, self._pending = self._pending, []
        self._context_text = self._decode(self._context)
        return now[len(before):]

    def rest(self, ids: Sequence[int]) -> str:
        """Everything not handed out yet, held-back bytes included (the end of the completion)."""
        before, now = self._context_text, self._new(ids)
        self._context, self._pending, self._context_text = [], [], ""
        return now[len(before):]


#: id(tokenizer) -> (the tokenizer, its special ids): found once per tokenizer, not per request (1.4 ms each for
#: DeepSeek's 1,230 special tokens, on the model's thread).
_SPECIAL_IDS: dict[int, tuple[object, frozenset]] = {}


def _special_ids(tokenizer) -> frozenset:
    """The ids a ``skip_special_tokens`` decode leaves out (a tokenizers ``Tokenizer``'s special added tokens)."""
    known = _SPECIAL_IDS.get(id(tokenizer))
    if known is None or known[0] is not tokenizer:
        added = getattr(tokenizer, "get_added_tokens_decoder", None)
        ids = frozenset(i for i, token in added().items() if token.special) if added else frozenset()
        known = _SPECIAL_IDS[id(tokenizer)] = (tokenizer, ids)
    return known[1]


class StopText:
    """A completion's text as its tokens come, cut before the first of ``stops``.

    :meth:`step` hands out the new text that cannot be part of a stop string; :attr:`stopped` turns true at the token
    that completes one; :attr:`text` is the completion so far, cut (after :meth:`rest`, the whole of it).  Before
    ``min_tokens`` tokens no stop string ends the text, as vLLM's ``min_tokens`` holds them back: the first that can
    is one that the text of a later token completes.
    """

    def __init__(self, tokenizer, stops: Sequence[str], skip_special_tokens: bool = True, min_tokens: int = 0):
        if not stops or not all(stops):
            raise ValueError(f"stop strings must be non-empty, got {list(stops)}")
        self.decoder = IncrementalText(tokenizer, skip_special_tokens)
        self.min_tokens = min_tokens
        self.stops = tuple(stops)
        self.longest = max(len(stop) for stop in self.stops)
        self.text = ""
        self.stopped = False
        self._handed = 0  # characters of ``text`` handed out
        self._held_n = 0  # characters at the end of ``text`` held back

    def _add(self, piece: str, tokens: int) -> None:
        """Add the text that the first ``tokens`` tokens brought; cut it at a stop string that it completes."""
        self.text += piece
        if tokens < self.min_tokens:
            return
        # A stop string that the new text completes: one that ends in it (the text before may hold one that was not
        # looked for, before min_tokens).
        before = len(self.text) - len(piece)
        found = [at for stop in self.stops if (at := self.text.find(stop, max(0, before - len(stop) + 1))) >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True

    def _held(self, added: int) -> int:
        """The length of the longest end of the text that is the beginning of a stop string.

        No longer than what was held before plus the ``added`` characters: a shorter end of the text before them
        would have been held then. So a step looks at a few characters, not at the longest stop string's length."""
        for n in range(min(self.longest - 1, len(self.text), self._held_n + added), 0, -1):
            end = self.text[-n:]
            if any(stop.startswith(end) for stop in self.stops):
                return n
        return 0

    def _hand(self, upto: int) -> str:
        piece, self._handed = self.text[self._handed:upto], max(self._handed, upto)
        return piece

    def step(self, ids: Sequence[int]) -> str:
        """The new text that can be handed out at this token ("" after a stop string)."""
        if self.stopped:
            return ""
        piece = self.decoder.step(ids)
        if not piece:
            return ""
        self._add(piece, len(ids))
        if self.stopped:
            return self._hand(len(self.text))
        self._held_n = self._held(len(piece))
        return self._hand(len(self.text) - self._held_n)

    def rest(self, ids: Sequence[int]) -> str:
        """Everything not handed out yet, up to a stop string (the end of the completion)."""
        if not self.stopped:
            self._add(self.decoder.rest(ids), len(ids))
        return self._hand(len(self.text))


class StreamedText:
    """The pieces of a stream: the first as soon as there is text, then one every ``interval`` tokens.

    ``interval`` 1 hands out every token's text.  A piece held back (it ended inside a character) is
    tried again at the next token, not ``interval`` tokens later.  With ``stops``, every token's text is looked at
    (:class:`StopText`, from ``min_tokens`` tokens on), so the stream ends at the token that completes a stop string
    (:attr:`stopped`).
    """

    def __init__(self, tokenizer, interval: int = DEFAULT_STREAM_INTERVAL, skip_special_tokens: bool = True,
                 stops: Sequence[str] = (), min_tokens: int = 0):
        if interval < 1:
            raise ValueError(f"the stream interval must be at least 1 token, got {interval}")
        self.text = StopText(tokenizer, stops, skip_special_tokens, min_tokens) if stops else IncrementalText(
            tokenizer, skip_special_tokens)
        self.interval = interval
        self._handed = 0  # tokens covered by the pieces handed out
        self._pieces = 0
        self._pending = ""  # with stops: text looked at but not yet due

    @property
    def stopped(self) -> bool:
        return getattr(self.text, "stopped", False)

    def step(self, ids: Sequence[int]) -> str:
        """The next piece, or "" when none is due at this token."""
        due = not self._pieces or len(ids) - self._handed >= self.interval
        if isinstance(self.text, StopText):
            self._pending += self.text.step(ids)
            if not (due or self.stopped) or not self._pending:
                return ""
            piece, self._pending = self._pending, ""
        else:
            if not due:
                return ""
            piece = self.text.step(ids)
        if piece:
            self._handed = len(ids)
            self._pieces += 1
        return piece

    def rest(self, ids: Sequence[int]) -> str:
        """Everything not handed out yet (the end of the completion)."""
        self._handed = len(ids)
        piece, self._pending = self._pending + self.text.rest(ids), ""
        return piece
