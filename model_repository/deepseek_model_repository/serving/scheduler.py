"""In-flight (iteration-level) batching over one runner's KV cache.

Requests wait in a queue.  Between two decode steps the scheduler admits waiting sequences into
free slots and prefills them (one batched engine call), then runs one decode step for every running
sequence.  A sequence leaves as soon as it ends (end-of-sentence token, ``max_tokens``, a
cancelled client or an error), and the running sequences are kept in the first slots so each
step's cache rows are contiguous.  So a request that arrives while others decode gets its first
token after at most one prefill and one step of the running batch.

Prefill is chunked: an iteration prefills at most ``max_prefill_tokens`` prompt tokens
(:data:`DEFAULT_PREFILL_TOKENS`, ``serving.prefillChunkTokens``), the oldest prompts first.  A longer prompt
holds its slot and is prefilled a chunk an iteration, the running sequences decoding between its chunks, so one
long prompt delays the tokens of the others by a chunk's prefill, never by its whole prompt's.  The sequences
being prefilled sit in the slots right after the running ones, in the order they arrived.  An engine call pads its
rows to its longest, so an iteration's prefill is split into calls whose padding stays small against their real
tokens (:func:`prefill_groups`): a long prompt does not make the short ones beside it as costly as itself.

The scheduler deals in token ids.  Callers (the Triton model, the benchmark) give each
:class:`Sequence` an ``on_token`` and an ``on_finish`` callback, called from the scheduler's
thread; the callbacks detokenize and send, and ``on_token`` returns true when the text reached a
stop string, which ends the sequence.

Asking a client whether it went away and updating a metric are round trips to Triton's process
when the scheduler runs there, so neither happens on the decode loop per token: a watcher thread
asks each queued and running sequence's client every :data:`CLIENT_POLL_S` seconds and marks the
sequence, which the loop drops at its next step; the metrics are counted here and published in
batches (:mod:`.metrics`).  The same watcher ends sequences whose request's timeout passed
(``Sequence.timeout_s``, Triton's per-request timeout): a running one at the loop's next step,
a queued one at once, with an error that says so.  And when the loop has work but has not finished an
iteration for :data:`STALL_S` seconds, a thread of its own (so that a client poll that never returns is
reported too) logs every thread's stack, once per stall: what a stuck scheduler waits on.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence as Seq

import numpy as np

from .metrics import IDLE_PUBLISH_S, PUBLISH_INTERVAL_S
from .runners import NAN_ROW, Runner, StepLogits
from .sampling import Sampling, log_probability, penalize, pick

log = logging.getLogger("deepseek_model_repository.scheduler")

#: Seconds between two rounds of the watcher's client polls (a client gone frees its slot about this soon).
CLIENT_POLL_S = 0.05
#: Seconds one iteration of the loop (an admission's prefill and a decode step) may take, with work waiting,
#: before the stall watcher logs every thread's stack.
STALL_S = 60.0
#: Prompt tokens one iteration prefills at most, unless the scheduler is given another budget.
DEFAULT_PREFILL_TOKENS = 2048
#: Padding a prefill call may carry beyond a quarter of its real tokens (:func:`prefill_groups`).
PREFILL_PAD_SLACK = 64
#: The shortest start of a prompt worth copying from another sequence's cache rather than prefilling.
PREFIX_MIN_TOKENS = 16

#: The phases of an engine call, as the metrics label them.
PREFILL, DECODE = "prefill", "decode"
#: How a sequence ended, as the metrics label it: its end-of-sentence token or a stop string; ``max_tokens`` or the
#: context's end; its client went away; its request's timeout passed; an error.
STOP, LENGTH, CANCELLED, TIMED_OUT, FAILED = "stop", "length", "cancelled", "timed_out", "failed"
OUTCOMES = (STOP, LENGTH, CANCELLED, TIMED_OUT, FAILED)


@dataclass(eq=False)
class Sequence:
    """One prompt being completed."""

    prompt_ids: list[int]
    sampling: Sampling
    #: Called with each new token; a true result ends the sequence there (its text reached a stop string).
    on_token: Callable[["Sequence", int], Optional[bool]] = lambda seq, token: None
    on_finish: Callable[["Sequence", Optional[str]], None] = lambda seq, error: None
    #: Polled by the scheduler's watcher thread: True when the client went away (its slot is freed at the next step).
    cancelled: Callable[[], bool] = lambda: False
    generated: list[int] = field(default_factory=list)
    #: Set before ``on_token``: this token is the sequence's last by length (``max_tokens``, or the context's end),
    #: so its ``on_finish`` comes right after (a stream leaves the token's text to its final response).
    last: bool = False
    slot: int = -1
    finished: bool = False
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    #: Set by the watcher: the client went away, or asking it failed (the failure).
    gone: bool = False
    poll_error: Optional[Exception] = None
    #: Held while the watcher polls, and while ``finished`` is set: no poll after the final response.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Seconds from ``arrived`` the request may take (Triton's per-request timeout); None: no limit.
    timeout_s: Optional[float] = None
    #: Set by the watcher: ``timeout_s`` passed; the sequence ends with :meth:`timeout_error`.
    expired: bool = False
    #: Prompt tokens in the cache: the prompt is prefilled in chunks when it is longer than an iteration's budget.
    prefilled: int = 0
    #: How it ended (one of :data:`OUTCOMES`), set before ``on_finish`` is called.
    outcome: Optional[str] = None
    #: Ended because the server stops (outcome FAILED): the request may be sent again, to another replica.
    server_stopping: bool = False
    #: Sum the log-probabilities of its tokens into ``cumulative_logprob`` (the model's raw distribution).
    logprobs: bool = False
    cumulative_logprob: float = 0.0
    #: Ended at an end-of-sentence token, which is neither in ``generated`` nor in the text.
    ended_at_eos: bool = False
    _rng: Optional[np.random.Generator] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"a request's timeout must be positive, got {self.timeout_s} s")

    @property
    def rng(self) -> np.random.Generator:
        """The sequence's random generator, made when it first samples (seeding one from the system's entropy costs
        more than a greedy sequence's whole admission)."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.sampling.seed)
        return self._rng

    @property
    def output_tokens(self) -> int:
        """The tokens it generated, an end-of-sentence token that ended it included, as vLLM counts them (and as
        ``cumulative_logprob`` sums them)."""
        return len(self.generated) + self.ended_at_eos

    def past_deadline(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.arrived >= self.timeout_s

    def timeout_error(self, slots: int, free: int = 0, prefilling: bool = False) -> str:
        """What passed and what to change; for a queued sequence, ``free``: the slots free as its timeout passed,
        ``prefilling``: whether other prompts were being prefilled then (which a free slot waits behind)."""
        limit = f"the request's timeout of {self.timeout_s * 1000:.0f} ms passed"
        more = "a longer timeout (the request's, or serving.requestTimeoutSeconds)"
        if self.slot < 0 and free and prefilling:
            return (f"{limit} while it waited behind longer prompts being prefilled (an iteration prefills at most "
                    f"serving.prefillChunkTokens prompt tokens): allow {more}, or send shorter prompts")
        if self.slot < 0 and free:
            return f"{limit} before it could be admitted: allow {more}"
        if self.slot < 0:
            return (f"{limit} while it waited for one of the {slots} KV-cache slots, all busy: allow {more}, or "
                    "serve more replicas")
        if self.prefilled < len(self.prompt_ids):
            return (f"{limit} after {self.prefilled} of its prompt's {len(self.prompt_ids)} tokens were prefilled: "
                    f"allow {more}, or send a shorter prompt")
        return (f"{limit} after {len(self.generated)} of its {self.sampling.max_tokens} tokens: allow {more}, or "
                "ask for fewer max_tokens")


class Metrics(Protocol):
    """What the scheduler reports (the Triton model publishes these through Triton's custom metrics).

    Every call but :meth:`publish` only counts; the scheduler calls :meth:`gauges` and then :meth:`publish`,
    which sends what changed, at most every ``publish_interval_s`` while it is busy, and once it has been idle for
    ``idle_publish_s``.
    """

    def gauges(self, waiting: int, running: int, cache_utilization: float) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def tokens(self, count: int) -> None: ...

    def admitted(self, queue_seconds: float, prompt_tokens: int) -> None:
        """A sequence got a slot after ``queue_seconds`` in the queue; its prompt of ``prompt_tokens`` is prefilled."""

    def engine_step(self, phase: str, seconds: float) -> None:
        """One engine call: ``phase`` is :data:`PREFILL` or :data:`DECODE`, ``seconds`` its wall time."""

    def ended(self, outcome: str) -> None:
        """A sequence ended; ``outcome`` is one of :data:`OUTCOMES`."""

    def prefix_shared(self, tokens: int) -> None:
        """An admitted prompt's first ``tokens`` were copied from another sequence's cache, not prefilled."""

    def publish(self) -> None: ...


class NoMetrics:
    def gauges(self, waiting, running, cache_utilization):
        pass

    def first_token(self, seconds):
        pass

    def inter_token(self, seconds):
        pass

    def tokens(self, count):
        pass

    def admitted(self, queue_seconds, prompt_tokens):
        pass

    def engine_step(self, phase, seconds):
        pass

    def ended(self, outcome):
        pass

    def prefix_shared(self, tokens):
        pass

    def publish(self):
        pass


def common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n = min(limit, len(a), len(b))
    if n <= 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if differ.size else n


def prefill_chunks(remaining: Seq[int], budget: int) -> list[int]:
    """This iteration's prompt tokens for each sequence being prefilled, in order (``remaining``: each one's prompt
    tokens not in the cache yet), within ``budget``: every one its rest until the budget runs out, which can cut only
    the last one short."""
    chunks = []
    for n in remaining:
        if budget <= 0:
            break
        chunks.append(min(n, budget))
        budget -= chunks[-1]
    return chunks


def prefill_groups(chunks: Seq[int]) -> list[tuple[int, int]]:
    """The engine calls of one iteration's prefill: ranges ``[first, stop)`` of its rows, in order.

    A call pads its rows to its longest chunk, so one long prompt among short ones would make every short row as
    costly as the long one.  Rows join the current call while its padded tokens stay within a quarter more than
    its real ones plus :data:`PREFILL_PAD_SLACK` (so that short prompts still share a call); otherwise a new call
    begins (rows stay in slot order: each call's slots are contiguous)."""
    groups: list[tuple[int, int]] = []
    first, width, real = 0, 0, 0
    for i, n in enumerate(chunks):
        if i > first and (i - first + 1) * max(width, n) > (real + n) * 5 // 4 + PREFILL_PAD_SLACK:
            groups.append((first, i))
            first, width, real = i, 0, 0
        width, real = max(width, n), real + n
    if chunks:
        groups.append((first, len(chunks)))
    return groups


class Scheduler:
    """Admits, steps and retires sequences on one runner, in a thread of its own."""

    def __init__(self, runner: Runner, eos_ids: Seq[int], *, metrics: Optional[Metrics] = None,
                 max_prefill_tokens: Optional[int] = None, share_prefixes: bool = True,
                 client_poll_s: float = CLIENT_POLL_S,
                 publish_interval_s: float = PUBLISH_INTERVAL_S, idle_publish_s: float = IDLE_PUBLISH_S,
                 stall_s: float = STALL_S):
        self.runner = runner
        self.cache = runner.cache
        self.eos = set(int(t) for t in eos_ids)
        self.metrics = metrics or NoMetrics()
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"prefill chunk of {max_prefill_tokens} tokens: it must be at least 1")
        #: Prompt tokens prefilled per iteration at most; a longer prompt is prefilled over several iterations.
        self.max_prefill_tokens = max_prefill_tokens or DEFAULT_PREFILL_TOKENS
        #: Copy the start of an admitted prompt from another sequence's cache where it holds the same tokens.
        self.share_prefixes = share_prefixes
        self.waiting: collections.deque[Sequence] = collections.deque()
        #: Sequences that decode, in slots [0, len(running)).
        self.running: list[Sequence] = []
        #: Sequences whose prompts are being prefilled, in the slots after the running ones, oldest first.
        self.prefilling: list[Sequence] = []
        self.steps = 0
        #: Iterations of the loop finished (the watcher's sign that it moves).
        self.iterations = 0
        self.stall_s = stall_s
        self.client_poll_s = client_poll_s
        self.publish_interval_s = publish_interval_s
        self.idle_publish_s = idle_publish_s
        self._published_at = float("-inf")
        #: Work done since the last publication (the loop publishes when it has been idle, only then).
        self._unpublished = False
        #: The last publication failed: an idle loop tries again every ``publish_interval_s`` (the gauges, which the
        #: autoscalers read, would otherwise keep a busy server's values until the next request).
        self._publish_failed = False
        self._cond = threading.Condition()
        #: Queued sequences the watcher took out of the queue (their timeout passed), for the loop to answer.
        self._left: list[Sequence] = []
        self._stop = False
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ outside the loop
    def start(self) -> "Scheduler":
        self._threads = [threading.Thread(target=self._loop, name="deepseek-scheduler", daemon=True),
                         threading.Thread(target=self._watch, name="deepseek-client-watch", daemon=True),
                         threading.Thread(target=self._watch_stalls, name="deepseek-stall-watch", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (never refused for being busy: a full server queues)."""
        if not seq.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if len(seq.prompt_ids) >= self.cache.capacity:
            raise ValueError(f"the prompt has {len(seq.prompt_ids)} tokens; the cache holds {self.cache.capacity} "
                             "per sequence, which must leave room for at least one new token")
        with self._cond:
            self.waiting.append(seq)
            self._cond.notify()

    def cache_utilization(self) -> float:
        return float(self.cache.lengths.sum()) / float(self.cache.slots * self.cache.capacity)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                publish = self._idle()
                if self._stop:
                    break
            if publish:  # outside the lock: a request that comes meanwhile is queued, not held in submit
                self._publish(idle=True)
                continue
            try:
                self._admit()
                self._retire()  # sequences that ended at their first token, or whose client went, leave before the step
                if self.running:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("scheduler step failed")
                for seq in self.running + self.prefilling:
                    self._finish(seq, f"generation failed: {exc}", FAILED)
            self._retire()
            self._unpublished = True
            self._publish()
            self.iterations += 1
        for seq in self.running + self.prefilling + list(self.waiting) + self._left:
            seq.server_stopping = True
            self._finish(seq, "the server is shutting down: send the request again (another replica serves it)",
                         FAILED)

    def _idle(self) -> bool:
        """Under the lock, wait while there is no work: True once the loop has been idle for ``idle_publish_s`` with
        something unpublished, False when there is work or a stop.  Not publishing at once on going idle keeps a
        closed-loop client's next request, which comes a few milliseconds later, from waiting on the publication."""
        while not self._stop and not self._busy():
            if not self._unpublished:
                self._cond.wait()
            elif (not self._cond.wait(self.publish_interval_s if self._publish_failed else self.idle_publish_s)
                  and not self._stop and not self._busy()):
                return True
        return False

    def _busy(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self._left)

    def _watch(self) -> None:
        """Ask each queued and running sequence's client whether it went away; mark the sequence for the loop.

        Queued sequences whose timeout passed, or whose client went away, leave the queue here (they no longer count
        as waiting), and the loop answers them at once; running ones are marked, and the loop ends them at its next
        step."""
        while not self._stopped.wait(self.client_poll_s):
            now = time.monotonic()
            with self._cond:
                for seq in self._leave_queue(lambda s: s.past_deadline(now)):
                    seq.expired = True
                # The loop changes ``running`` outside the lock, but a list copy is atomic under the GIL.
                seqs = list(self.waiting) + list(self.running) + list(self.prefilling)
            for seq in seqs:
                if not seq.expired and seq.past_deadline(now):
                    seq.expired = True
                with seq.lock:
                    if seq.finished or seq.gone or seq.poll_error is not None:
                        continue
                    try:
                        seq.gone = bool(seq.cancelled())
                    except Exception as exc:  # noqa: BLE001 - one client's failed poll costs that sequence only
                        log.warning("asking whether a client went away failed; ending its sequence", exc_info=True)
                        seq.poll_error = exc
            with self._cond:
                self._leave_queue(lambda s: s.gone or s.poll_error is not None)

    def _leave_queue(self, ended: Callable[[Sequence], bool]) -> list[Sequence]:
        """Under the lock: take the queued sequences that have ``ended`` out of the queue, for the loop to answer
        at once (they no longer count as waiting); returns them."""
        left = [seq for seq in self.waiting if ended(seq)]
        if left:
            for seq in left:
                self.waiting.remove(seq)
            self._left.extend(left)
            self._cond.notify()
        return left

    def _watch_stalls(self) -> None:
        moved = (self.iterations, time.monotonic(), False)  # the loop's count, when it last changed, reported
        while not self._stopped.wait(min(1.0, self.stall_s / 4)):
            moved = self._check_stall(moved, time.monotonic())

    def _check_stall(self, moved: tuple[int, float, bool], now: float) -> tuple[int, float, bool]:
        """Log every thread's stack when the loop has work and has not finished an iteration for ``stall_s``."""
        iterations, since, reported = moved
        busy = self._busy()
        if self.iterations != iterations or not busy:
            return self.iterations, now, False
        if not reported and now - since >= self.stall_s:
            frames = sys._current_frames()
            stacks = "\n".join(f"thread {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
                                for t in threading.enumerate() if t.ident in frames)
            log.error("the scheduler's loop has not finished an iteration for %.0f s, with %d sequences running, %d "
                      "being prefilled and %d waiting; every thread's stack:\n%s", now - since, len(self.running),
                      len(self.prefilling), len(self.waiting), stacks)
            return iterations, since, True
        return moved

    def _publish(self, idle: bool = False) -> None:
        """Hand the metrics over to be sent: every ``publish_interval_s`` while busy, and when idle (``_idle``)."""
        now = time.monotonic()
        if not idle and now - self._published_at < self.publish_interval_s:
            return
        self._published_at = now
        self._unpublished = False
        try:
            # A sequence being prefilled holds its slot: it counts as running.
            self.metrics.gauges(len(self.waiting), len(self.running) + len(self.prefilling), self.cache_utilization())
            self.metrics.publish()
        except Exception:  # noqa: BLE001 - metrics are never worth a stopped scheduler
            if not self._publish_failed:  # once per run of failures, not every second
                log.warning("publishing the scheduler's metrics failed; trying again every %.0f s",
                            self.publish_interval_s, exc_info=True)
            self._publish_failed = self._unpublished = True
        else:
            if self._publish_failed:
                log.info("publishing the scheduler's metrics works again")
            self._publish_failed = False

    def _admit(self) -> None:
        """Move waiting sequences into free slots, and prefill: at most ``max_prefill_tokens`` prompt tokens, the
        sequences already being prefilled first, then the newly admitted, oldest first.  Those whose whole prompt is
        in the cache take their first token and join the running sequences."""
        # Admit while this iteration's budget has room, counting each admitted prompt whole (a shared prefix can only
        # make it shorter).
        room = self.max_prefill_tokens - sum(len(s.prompt_ids) - s.prefilled for s in self.prefilling)
        free = self.cache.slots - len(self.running) - len(self.prefilling)
        admitted: list[Sequence] = []
        now = time.monotonic()
        with self._cond:
            left, self._left = self._left, []  # ended while they waited: answered below, outside the queue's lock
            while self.waiting and len(admitted) < free and room > 0:
                seq = self.waiting.popleft()
                if seq.past_deadline(now):  # before the watcher's look: one that came late (it waited in the relay)
                    seq.expired = True
                if seq.gone or seq.expired or seq.poll_error is not None:
                    left.append(seq)
                    continue
                admitted.append(seq)
                room -= len(seq.prompt_ids)
        for seq in left:
            self._dropped(seq)
        # Every admitted sequence holds its slot before any work on one of them, so that a failure of that work
        # finishes them all (the loop's handler ends the sequences in slots).
        for index, seq in enumerate(admitted, start=len(self.running) + len(self.prefilling)):
            seq.slot, seq.prefilled = index, 0
            self.cache.clear(index)
        self.prefilling.extend(admitted)
        for seq in admitted:
            if self.share_prefixes:
                self._share_prefix(seq)
            self.metrics.admitted(now - seq.arrived, len(seq.prompt_ids))
        chunks = prefill_chunks([len(s.prompt_ids) - s.prefilled for s in self.prefilling], self.max_prefill_tokens)
        if not chunks:
            return
        rows = self.prefilling[:len(chunks)]  # slots [len(running), len(running) + len(rows))
        for first, stop in prefill_groups(chunks):
            if not self._prefill(rows[first:stop], chunks[first:stop]):
                break

    def _share_prefix(self, seq: Sequence) -> None:
        """Copy into ``seq``'s slot the longest start of its prompt that another sequence's cache already holds (the
        same tokens at the same positions have the same keys and values), when it is at least
        :data:`PREFIX_MIN_TOKENS`; the last prompt token is always prefilled, for the logits of the first token."""
        best, source = 0, None
        limit = len(seq.prompt_ids) - 1
        if limit < PREFIX_MIN_TOKENS:
            return
        start = seq.prompt_ids[:PREFIX_MIN_TOKENS]
        for other in self.running + self.prefilling:
            cached = int(self.cache.lengths[other.slot])
            if cached < PREFIX_MIN_TOKENS or other.prompt_ids[:PREFIX_MIN_TOKENS] != start:
                continue  # the cheap test first: most prompts differ within their first tokens
            tokens = other.prompt_ids if cached <= len(other.prompt_ids) else other.prompt_ids + other.generated
            n = common_prefix(seq.prompt_ids, tokens, min(limit, cached))
            if n > best:
                best, source = n, other
        if source is not None and best >= PREFIX_MIN_TOKENS:
            self.cache.copy_prefix(source.slot, seq.slot, best)
            seq.prefilled = best
            self.metrics.prefix_shared(best)

    def _prefill(self, rows: list[Sequence], chunks: list[int]) -> bool:
        """One engine call: ``chunks[r]`` more prompt tokens of each of ``rows``, the first prefilling sequences (in
        contiguous slots right after the running ones).  Those whose prompt is then whole take their first token
        and join the running sequences.  False when the engine failed (the rows' sequences fail with it)."""
        ids = np.zeros((len(rows), max(chunks)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, (seq, n) in enumerate(zip(rows, chunks)):
            ids[r, :n] = seq.prompt_ids[seq.prefilled:seq.prefilled + n]
            mask[r, :n] = 1
        try:
            began = time.perf_counter()
            logits = self.runner.forward(rows[0].slot, ids, mask)
            self.metrics.engine_step(PREFILL, time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - a failed prefill fails its own sequences only
            log.exception("prefill failed")
            for seq in rows:
                self._finish(seq, f"generation failed: {exc}", FAILED)
            return False
        for seq, n in zip(rows, chunks):
            seq.prefilled += n
        # Every row but the iteration's last took the rest of its prompt (the budget ran out at the last at most), so
        # the prefilled sequences are the first rows, in the slots right after the running ones.
        done = [seq for seq in rows if seq.prefilled == len(seq.prompt_ids)]
        self.prefilling = self.prefilling[len(done):]
        self.running.extend(done)
        for r, seq in enumerate(done):  # before the next call: a runner may reuse its logits' buffer
            self._advance(seq, logits, r)
        if len(done) < len(rows) and logits.argmax()[len(rows) - 1] == NAN_ROW:
            # A chunk before the prompt's last: no token comes of its logits, but they show a NaN entering the
            # cache as it enters, before the slot is moved, left, or copied from.
            self._fail_nan(rows[-1])
        return True

    def _decode(self) -> None:
        n = len(self.running)
        ids = np.zeros((n, 1), dtype=np.int64)
        for seq in self.running:
            ids[seq.slot, 0] = seq.generated[-1]
        began = time.perf_counter()
        logits = self.runner.forward(0, ids, np.ones((n, 1), dtype=np.int64))
        self.metrics.engine_step(DECODE, time.perf_counter() - began)
        self.steps += 1
        for seq in self.running:
            if not seq.finished:
                self._advance(seq, logits, seq.slot)

    def _advance(self, seq: Sequence, logits: StepLogits, row: int) -> None:
        """Choose the next token of ``seq`` (row ``row`` of the step), hand it on, and end the sequence when it is
        done.  Greedy rows take the step's argmax, computed where the logits are."""
        early = bool(self.eos) and len(seq.generated) < seq.sampling.min_tokens  # too early for the end of sentence
        if early or seq.sampling.penalized:
            changed = np.array(logits.row(row), dtype=np.float32)  # a copy: the step's logits stay raw
            if seq.sampling.penalized:
                penalize(changed, seq)
            if early:
                changed[[t for t in self.eos if t < changed.size]] = -np.inf
            token = pick(changed, seq)
        elif seq.sampling.temperature == 0.0:
            token = int(logits.argmax()[row])
        else:
            token = pick(logits.row(row), seq)
        if token == NAN_ROW:
            self._fail_nan(seq)
            return
        if seq.logprobs:  # an end-of-sentence token that ends the sequence counts too, as in vLLM
            seq.cumulative_logprob += log_probability(logits.row(row), token)
        now = time.monotonic()
        if token in self.eos and not seq.sampling.ignore_eos:
            seq.ended_at_eos = True
            self._finish(seq, None, STOP)
            return
        seq.generated.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.first_token(now - seq.arrived)
        else:
            self.metrics.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.tokens(1)
        room = self.cache.capacity - int(self.cache.lengths[seq.slot]) - 1
        seq.last = len(seq.generated) >= seq.sampling.max_tokens or room <= 0  # prompt + completion fit the context
        try:
            stop = seq.on_token(seq, token)
        except Exception as exc:  # noqa: BLE001 - one sequence's failure ends that sequence only
            if self._client_left(seq):
                log.info("a sequence whose client went away ended at its response (%s)", exc)
                self._finish(seq, None, CANCELLED)
            else:
                log.exception("a sequence's response failed")
                self._finish(seq, f"generation failed: {exc}", FAILED)
            return
        if stop:
            self._finish(seq, None, STOP)
        elif seq.last:
            self._finish(seq, None, LENGTH)

    def _fail_nan(self, seq: Sequence) -> None:
        """End ``seq``, whose step's logits hold NaN (every step's are looked at, prefill chunks' too, so this is the
        step where the NaN entered its cache), and zero its slot: the NaN would reach the next sequence there through
        the masked positions of its attention."""
        self.cache.scrub(seq.slot)
        where = (f"for token {len(seq.generated) + 1} of this completion" if seq.prefilled >= len(seq.prompt_ids)
                 else f"after {seq.prefilled} of its prompt's {len(seq.prompt_ids)} tokens")
        self._finish(seq, f"generation failed: the engine's logits {where} hold NaN, a numeric overflow in the "
                     "engine (fp16 gives them on some models): build it with a wider engine.precision (fp32, or "
                     "bf16 with backend tensorrt)", FAILED)

    def _finish(self, seq: Sequence, error: Optional[str], outcome: str) -> None:
        """End ``seq`` (once): count its ``outcome`` and send its final response (``on_finish``).

        Every sequence gets one, a cancelled one too (``outcome`` CANCELLED): Triton holds a request until its final
        response, whether or not its client is still there, and a relay waits for it."""
        with seq.lock:
            if seq.finished:
                return
            seq.finished = True
            seq.outcome = outcome
        try:
            self.metrics.ended(outcome)
        except Exception:  # noqa: BLE001 - metrics are never worth a request left unanswered
            log.warning("counting a sequence's end failed", exc_info=True)
        try:
            seq.on_finish(seq, error)
        except Exception:  # noqa: BLE001
            if outcome == CANCELLED:
                log.info("the final response of a cancelled sequence could not be sent (its client is gone)")
            else:
                log.warning("the final response of a sequence could not be sent", exc_info=True)

    @staticmethod
    def _client_left(seq: Sequence) -> bool:
        """Did the client of ``seq`` go away (a response that could not be sent: gone, or asking failed too)?"""
        with seq.lock:  # the watcher polls under it
            try:
                return seq.gone or bool(seq.cancelled())
            except Exception:  # noqa: BLE001
                return True

    def _dropped(self, seq: Sequence) -> bool:
        """Has the watcher found the client of ``seq`` gone (or failed to ask), or its timeout passed?  Then ``seq``
        is finished."""
        if seq.poll_error is not None:
            self._finish(seq, f"generation failed: the scheduler could not check its client ({seq.poll_error})",
                         FAILED)
            return True
        if seq.expired and not seq.gone:
            free = self.cache.slots - len(self.running) - len(self.prefilling)
            self._finish(seq, seq.timeout_error(self.cache.slots, free, bool(self.prefilling)), TIMED_OUT)
            return True
        if seq.gone:
            self._finish(seq, None, CANCELLED)
        return seq.gone

    def _retire(self) -> None:
        """Drop finished sequences and those whose client went away; keep the running ones in slots [0, n) and
        those being prefilled in the slots after them, in their order.

        Slots are filled from the end: each running sequence beyond the first n takes a slot that a finished one
        left in [0, n), so a sequence that ends moves at most one other's cache (not every one after it), and the
        running ones stay where they are otherwise.  The prefilling ones (few, and no longer than their prompts)
        close up behind them."""
        held = self.running + self.prefilling
        for seq in held:
            if not seq.finished:
                self._dropped(seq)
        if not any(s.finished for s in held):
            return
        running = [s for s in self.running if not s.finished]
        prefilling = [s for s in self.prefilling if not s.finished]
        n = len(running)
        free = iter(sorted(set(range(n)) - {s.slot for s in running}))
        for seq in running:
            if seq.slot >= n:
                self._move(seq, next(free))
        for index, seq in enumerate(prefilling, start=n):  # each target lies at or before its source, and is free
            if seq.slot != index:
                self._move(seq, index)
        for slot in range(n + len(prefilling), len(held)):
            self.cache.clear(slot)
        self.running, self.prefilling = running, prefilling

    def _move(self, seq: Sequence, slot: int) -> None:
        self.cache.move(seq.slot, slot)
        seq.slot = slot
