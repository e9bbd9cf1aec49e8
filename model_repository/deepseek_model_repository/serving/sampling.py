"""How the scheduler chooses a sequence's next token: the request's sampling parameters (:class:`Sampling`), its
penalties (:func:`penalize`), the choice itself (:func:`pick`), and the chosen token's log-probability
(:func:`log_probability`). The scheduler (:mod:`.scheduler`) calls them on each row of a step's logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from .runners import NAN_ROW


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature`` is 0.

    The end-of-sentence tokens cannot be chosen before ``min_tokens`` tokens (their logits are masked, as
    transformers' ``min_new_tokens`` and vLLM's ``min_tokens`` do; the detokenizer holds stop strings back as long,
    as vLLM does, :class:`~.detokenize.StopText`); with ``ignore_eos`` they are tokens like any
    other and the completion ends only at ``max_tokens`` (or a stop string).  Penalties change the logits before
    the choice, as vLLM applies them: ``repetition_penalty`` divides the positive logits (and multiplies the
    negative ones) of every token of the prompt and the completion so far (transformers' ``repetition_penalty``);
    then each token of the completion so far loses ``presence_penalty`` once and ``frequency_penalty`` per
    occurrence (OpenAI's penalties)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class Sampled(Protocol):
    """What choosing a token reads of a sequence (``scheduler.Sequence``)."""

    sampling: Sampling
    prompt_ids: list[int]
    generated: list[int]

    @property
    def rng(self) -> np.random.Generator: ...


def pick(logits: np.ndarray, seq: Sampled) -> int:
    """Greedy when temperature is 0; otherwise temperature, top-k and top-p sampling.  :data:`NAN_ROW` when the
    logits hold a NaN."""
    s = seq.sampling
    if np.isnan(np.max(logits)):
        return NAN_ROW
    if s.temperature == 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / s.temperature
    if 0 < s.top_k < x.size:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        x = np.where(x < kth, -np.inf, x)
    if not np.isfinite(np.max(x)):
        return int(np.argmax(logits))  # inf/nan logits: no distribution to sample from
    x = x - np.max(x)
    probs = np.exp(x)
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, s.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(seq.rng.choice(probs.size, p=probs))


def penalize(logits: np.ndarray, seq: Sampled) -> None:
    """Apply ``seq``'s repetition, presence and frequency penalties to ``logits`` (a row, changed in place)."""
    s = seq.sampling
    if s.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(seq.prompt_ids + seq.generated, dtype=np.int64))
        seen = seen[seen < logits.size]
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
    if seq.generated and (s.presence_penalty or s.frequency_penalty):
        ids, counts = np.unique(np.asarray(seq.generated, dtype=np.int64), return_counts=True)
        keep = ids < logits.size
        logits[ids[keep]] -= s.frequency_penalty * counts[keep] + s.presence_penalty


def log_probability(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x)
    return float(x[token] - top - np.log(np.sum(np.exp(x - top))))
