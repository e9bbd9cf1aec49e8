"""Text generation: the scheduler that batches in flight, with the engine in this process (``NAME_stream``).

``execute`` checks and tokenizes each request, hands it to the scheduler
(``deepseek_model_repository.serving``) and returns at once; the scheduler's thread admits
requests into free KV-cache slots between decode steps and answers each one through its
response sender.  A request with ``stream`` true gets one response per piece of text (one every
``stream_interval`` tokens, the first at once), the last piece on its final response (empty text when
nothing is left); any other request gets its whole completion in one final response.  The client-facing ``NAME`` model relays
its requests here, so plain requests and streams share one scheduler, one engine and one cache; when a relayed
request's client goes away the relay says so in a request of its own, and its sequences are dropped.
A request's own timeout (tritonclient's ``timeout``), or ``serving.requestTimeoutSeconds`` where that is shorter,
bounds its generation: when it passes, the request is answered with an UNAVAILABLE error that says so, and its
slot is freed.

The scheduler publishes its metrics through the Python backend's custom-metrics API on Triton's
metrics port (see ``SchedulerMetrics``).
"""

import collections
import gc
import json
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from deepseek_model_repository.serving import limits, metrics
from deepseek_model_repository.serving.detokenize import DEFAULT_STREAM_INTERVAL, StopText, StreamedText
from deepseek_model_repository.serving.processes import announce_initialized
from deepseek_model_repository.serving.responder import Responder
from deepseek_model_repository.serving.triton import (FAILED, client_gone, dump_threads_on_signal, error_code,
                                                      error_response, model_parameters, request_timeout_s,
                                                      sequence_error)
from deepseek_model_repository.serving.runners import RunnerError, open_runner
from deepseek_model_repository.serving.scheduler import (DECODE, DEFAULT_PREFILL_TOKENS, OUTCOMES, PREFILL, NoMetrics,
                                                         Scheduler, Sequence)


class SchedulerMetrics:
    """The scheduler's series on Triton's metrics port, labelled with the client-facing model name.

    ``deepseek_scheduler_requests_waiting`` over ``..._slots`` is the queue signal the autoscalers read
    (``deepseek_operator.autoscaling``); ``..._sequences_running`` is the batch; ``..._kv_cache_utilization`` is the
    fraction of cache positions in use; ``..._time_to_first_token_seconds`` and ``..._inter_token_latency_seconds``
    are histograms; ``..._generated_tokens_total`` counts tokens and ``..._engine_steps_total`` engine calls;
    ``..._queue_time_seconds`` is a histogram of the wait for a slot, ``..._prompt_tokens_total`` counts the admitted
    prompts' tokens and ``..._prefix_shared_tokens_total`` those of them copied from another sequence's cache rather
    than prefilled; ``..._sequences_ended_total`` counts sequences by how they ended (label ``outcome``: stop, length, cancelled,
    timed_out, failed);
    ``..._engine_step_seconds`` is a histogram of each engine call's time, labelled ``phase`` (prefill or decode), whose
    ``_sum`` rate is the fraction of the time the engine runs.

    Each update of a Triton metric is a round trip to Triton's process, so the scheduler's events are counted
    here and :meth:`publish` sends what changed; the scheduler calls it at most every ``PUBLISH_INTERVAL_S``, and
    once it has been idle for ``IDLE_PUBLISH_S`` (:mod:`deepseek_model_repository.serving.metrics`).
    """

    def __init__(self, model_name):
        self.labels = {"model": model_name}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER

        def family(name, description, kind):
            return pb_utils.MetricFamily(name=f"deepseek_scheduler_{name}", description=description, kind=kind)

        self.families = [
            family(metrics.WAITING_NAME, metrics.WAITING_HELP, gauge),
            family("sequences_running", "Sequences decoding in the running batch", gauge),
            family("kv_cache_utilization", "Fraction of the KV cache's positions in use (0 to 1)", gauge),
            family("generated_tokens_total", "Tokens generated", counter),
            family("engine_steps_total", "Engine calls: prefills and decode steps", counter),
            family("slots", "Sequences that can decode together (the KV cache's slots)", gauge),
            family("prompt_tokens_total", "Prompt tokens of the admitted sequences, shared prefixes included", counter),
            family("prefix_shared_tokens_total", "Prompt tokens copied from another sequence's KV cache instead of "
                   "prefilled", counter),
        ]
        self.waiting, self.running, self.cache, self.generated, self.steps, self.slots, self.prompt, self.shared = (
            f.Metric(labels=self.labels) for f in self.families)
        ended = family("sequences_ended_total", "Sequences ended, by outcome: stop (end-of-sentence token or a stop "
                       "string), length (max_tokens or the context), cancelled (the client went away), timed_out "
                       "(the request's timeout), failed", counter)
        self.families.append(ended)
        self.outcomes = {o: ended.Metric(labels={**self.labels, "outcome": o}) for o in OUTCOMES}
        self._ended = dict.fromkeys(OUTCOMES, 0)
        self.histograms = [
            *self._histogram(family, "time_to_first_token_seconds", "From arrival to the first generated token",
                             metrics.TTFT_BUCKETS),
            *self._histogram(family, "inter_token_latency_seconds", "Between two tokens of one sequence",
                             metrics.ITL_BUCKETS),
            *self._histogram(family, "queue_time_seconds", "From arrival to a KV-cache slot (admission)",
                             metrics.TTFT_BUCKETS),
            *self._histogram(family, "engine_step_seconds", "One engine call (phase: prefill or decode)",
                             metrics.ENGINE_STEP_BUCKETS, phases=(PREFILL, DECODE)),
        ]
        (self.ttft, _), (self.itl, _), (self.queue, _), *steps = self.histograms
        self.step_seconds = {phase: local for phase, (local, _) in zip((PREFILL, DECODE), steps)}
        self._tokens = self._steps = self._prompt_tokens = self._shared_tokens = 0
        #: What Triton holds: a new gauge reads 0, so the scheduler's first (idle) publication sends nothing, and its
        #: thread makes no round trip to Triton's process while ``initialize`` is still being answered.
        self._gauges = self._sent_gauges = (0, 0, 0.0)

    def _histogram(self, family, name, description, buckets, phases=None):
        """A classic histogram as counters (``_bucket`` by ``le``, ``_sum``, ``_count``), fed from a local one;
        with ``phases``, one such histogram per ``phase`` label in the same families."""
        counter = pb_utils.MetricFamily.COUNTER
        bucket_family = family(f"{name}_bucket", f"{description} (cumulative count of seconds <= le)", counter)
        sum_family = family(f"{name}_sum", f"{description}: sum of seconds", counter)
        count_family = family(f"{name}_count", f"{description}: observations", counter)
        self.families += [bucket_family, sum_family, count_family]
        made = []
        for labels in ([{**self.labels, "phase": phase} for phase in phases] if phases else [self.labels]):
            local = metrics.Histogram(buckets)
            series = {bound: bucket_family.Metric(labels={**labels, "le": metrics.le_label(bound)})
                      for bound in local.bounds}
            made.append((local, (series, sum_family.Metric(labels=labels), count_family.Metric(labels=labels))))
        return made

    # ---- counted here, from the scheduler's thread
    def gauges(self, waiting, running, cache_utilization):
        self._gauges = (waiting, running, cache_utilization)

    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def inter_token(self, seconds):
        self.itl.observe(seconds)

    def tokens(self, count):
        self._tokens += count

    def admitted(self, queue_seconds, prompt_tokens):
        self.queue.observe(queue_seconds)
        self._prompt_tokens += prompt_tokens

    def engine_step(self, phase, seconds):
        self._steps += 1
        self.step_seconds[phase].observe(seconds)

    def ended(self, outcome):
        self._ended[outcome] += 1

    def prefix_shared(self, tokens):
        self._shared_tokens += tokens

    # ---- sent to Triton
    def publish(self):
        if self._gauges != self._sent_gauges:
            for metric, value, sent in zip((self.waiting, self.running, self.cache), self._gauges,
                                           self._sent_gauges):
                if value != sent:
                    metric.set(value)
            self._sent_gauges = self._gauges
        # A count is taken once it is sent, so a publication that fails (the scheduler tries again) loses none;
        # a histogram keeps what it could not send the same way (``metrics.Histogram.publish``).
        for count, metric in (("_tokens", self.generated), ("_steps", self.steps), ("_prompt_tokens", self.prompt),
                              ("_shared_tokens", self.shared)):
            n = getattr(self, count)
            if n:
                metric.increment(n)
                setattr(self, count, 0)
        for outcome, n in self._ended.items():
            if n:
                self.outcomes[outcome].increment(n)
                self._ended[outcome] = 0
        for local, (series, total, count) in self.histograms:
            local.publish(lambda bound, n, series=series: series[bound].increment(n), total.increment, count.increment)


def sent_details(details, requested):
    """The ``details`` asked for (``return_*``) that the client requested as outputs too (Triton requests every output
    where a client names none). A response carries no other output: the stub would drop it while it sends, without
    the GIL (see ``serving.triton.decoupled_responses``). And it always carries ``text_output``, so a request must
    ask for that."""
    if "text_output" not in requested:
        raise limits.RequestError(f"the request asks for the outputs {sorted(requested)} but not text_output, which "
                                  "every response of this model carries: request text_output too (or name no "
                                  "outputs, which requests them all)")
    return tuple(name for name in details if name in requested)


def text_response(texts, details=(), seqs=(), output_tokens=None):
    """The texts, one per prompt; with ``details`` (names of ``limits.DETAILS``), those outputs of ``seqs`` too:
    ``finish_reason`` once they have ended, ``num_output_tokens`` the tokens these texts cover (``output_tokens``,
    else every token of each sequence, ``Sequence.output_tokens``: an end-of-sentence token that ended it too)."""
    array = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
    tensors = [pb_utils.Tensor("text_output", array)]
    for name in details:
        if name == "finish_reason":
            if any(s.outcome is None for s in seqs):
                continue  # a stream's response before the last
            value = np.array([[s.outcome.encode("utf-8")] for s in seqs], dtype=np.object_)
        elif name == "num_input_tokens":
            value = np.array([[len(s.prompt_ids)] for s in seqs], dtype=np.uint32)
        elif name == "num_output_tokens":
            counts = output_tokens if output_tokens is not None else [s.output_tokens for s in seqs]
            value = np.array([[n] for n in counts], dtype=np.uint32)
        else:  # cumulative_logprob
            value = np.array([[s.cumulative_logprob] for s in seqs], dtype=np.float32)
        tensors.append(pb_utils.Tensor(name, value))
    return pb_utils.InferenceResponse(output_tensors=tensors)


@dataclass
class StreamSoFar:
    """What a stream's responses have sent so far: the tokens they covered, and the text held back for the final
    response (that of a token that ended the sequence by length)."""

    covered: int = 0
    held: str = ""

    def cover(self, seq) -> list[int]:
        """``num_output_tokens`` of a response sent now: the tokens since the last response (``seq.output_tokens``
        counts an end-of-sentence token that ended it, as vLLM does)."""
        count, self.covered = seq.output_tokens - self.covered, seq.output_tokens
        return [count]


class TritonPythonModel:
    """The scheduler model: one engine, one KV cache, every text-generation request of this server."""

    def initialize(self, args):
        """Open the engine and its cache where it runs, and start the scheduler's thread."""
        dump_threads_on_signal()
        config, params = model_parameters(args)
        engine_dir = params["engine_dir"]
        with open(os.path.join(engine_dir, "model-info.json"), encoding="utf-8") as fh:
            info = json.load(fh)
        self.model_name = config["name"]
        self.client_name = params.get("client_model", self.model_name)
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.stream_interval = int(params.get("stream_interval", DEFAULT_STREAM_INTERVAL))
        #: serving.requestTimeoutSeconds: the longest a request may take unless it asks for less (0: no limit).
        self.request_timeout_s = float(params.get("request_timeout_s", "0"))
        tok_dir = os.path.join(engine_dir, info.get("tokenizer_dir", "tokenizer"))
        self.tokenizer = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        self.limits = limits.RequestLimits.for_tokenizer(self.tokenizer, int(info["max_sequence_length"]))
        try:
            runner = open_runner(engine_dir, info, slots=int(info["max_batch_size"]),
                                 capacity=int(info["max_sequence_length"]), device=params.get("device", "cpu"),
                                 threads=int(params.get("engine_threads", "0")))
        except RunnerError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        #: Relay id -> set when the relay says that request's client went away (``_cancel_relayed``).
        self._relayed: dict = {}
        #: Relay ids cancelled before their request came (the newest ``limits.RELAY_THREADS``; ended ones too).
        self._cancelled_early: collections.OrderedDict = collections.OrderedDict()
        self._relayed_lock = threading.Lock()
        self.metrics = SchedulerMetrics(self.client_name)
        self.metrics.slots.set(runner.cache.slots)
        #: serving.prefillChunkTokens: prompt tokens one iteration prefills; longer prompts go in chunks.
        chunk = int(params.get("prefill_chunk_tokens", DEFAULT_PREFILL_TOKENS))
        #: serving.prefixSharing: copy a prompt's start from another sequence's cache where it holds it.
        share = params.get("share_prefixes", "true") == "true"
        #: Sends plain requests' responses, so that the scheduler's thread goes on to its next step.
        self.responder = Responder()
        self.scheduler = Scheduler(runner, info.get("eos_token_ids", []), metrics=self.metrics,
                                   max_prefill_tokens=chunk, share_prefixes=share).start()
        announce_initialized(args)

    def execute(self, requests):
        """Check, tokenize and queue each request; the scheduler answers them later."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            params = limits.request_parameters(request)
            relayed = limits.RELAY_ID in params
            try:
                if limits.PING in params:  # the liveness probe, through the relay: this process answers
                    sender.send(text_response([""]), flags=final)
                    continue
                if limits.CANCEL_RELAYED in params:
                    self._cancel_relayed(str(params[limits.CANCEL_RELAYED]))
                    sender.send(flags=final)
                    continue
                parsed = limits.parse_generation_request(request, self.limits, self.tokenizer,
                                                         self.default_max_tokens, pb_utils, self.model_name)
                details = sent_details(parsed.details, request.requested_output_names())
                timeout_s = min((t for t in (request_timeout_s(request), self.request_timeout_s) if t), default=None)
            except limits.RequestError as exc:
                sender.send(error_response(str(exc), relayed=relayed), flags=final)
                continue
            except Exception as exc:  # noqa: BLE001 - any failure answers this request only
                sender.send(error_response(f"bad request: {exc}", relayed=relayed), flags=final)
                continue
            if parsed.stream:
                self.scheduler.submit(self._stream(parsed.prompts[0], sender, timeout_s, details))
            else:
                arrived = limits.arrival(params, time.monotonic())
                for seq in self._whole(parsed.prompts, sender, params.get(limits.RELAY_ID), timeout_s, details,
                                       arrived):
                    self.scheduler.submit(seq)
        return None

    def _stream(self, prompt, sender, timeout_s=None, details=()):
        """A streamed sequence: a response per piece of text (every ``stream_interval`` tokens), the last piece on
        the final response (with the ``details`` asked for).

        The text of a token that ends the sequence by length goes on the final response rather than one of its own.
        The final response always carries ``text_output``, empty where nothing is left (at the end-of-sentence token,
        say), as Triton's vLLM backend's does: a response with outputs reaches every client marked final
        (``triton_final_response``), while one with the final flag alone reaches only clients that ask for empty
        final responses, and a client that does not would never learn that its stream ended."""
        text = StreamedText(self.tokenizer, self.stream_interval, stops=prompt.stop,
                            min_tokens=prompt.sampling.min_tokens)
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        so_far = StreamSoFar()

        def on_token(seq, token):
            delta = text.step(seq.generated)
            if seq.last:
                so_far.held = delta
            elif delta:
                sender.send(text_response([delta], details, [seq], so_far.cover(seq)))
            return text.stopped

        def on_finish(seq, error):
            error = sequence_error(seq, error)
            if error:
                sender.send(error_response(error, error_code(seq)), flags=final)
                return
            rest = so_far.held + text.rest(seq.generated)
            sender.send(text_response([rest], details, [seq], so_far.cover(seq)), flags=final)

        return Sequence(prompt.prompt_ids, prompt.sampling, on_token=on_token, on_finish=on_finish,
                        cancelled=client_gone(sender), timeout_s=timeout_s, logprobs="cumulative_logprob" in details)

    def _whole(self, prompts, sender, relay_id=None, timeout_s=None, details=(), arrived=None):
        """The sequences of a request answered in one response, sent when the last of them ends; ``arrived``: when the
        request came (the relay's clock), from which its timeout and its time to first token count.

        A relayed request (``relay_id``) is told apart from its client by the relay: the relay's request is never
        cancelled, so its sequences are dropped when the relay names it in a cancel. A request whose client went
        away is answered with a CANCELLED error (Triton, and a relay, wait for the final response all the same)."""
        seqs = []
        errors = []  # (message, its error code)
        pending = [len(prompts)]
        cancelled = client_gone(sender)
        if relay_id is not None:
            gone = threading.Event()
            with self._relayed_lock:
                self._relayed[str(relay_id)] = gone
                if self._cancelled_early.pop(str(relay_id), False):
                    gone.set()
            cancelled = gone.is_set

        def text_of(seq, stopper):
            if stopper is None:
                return self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            stopper.rest(seq.generated)
            return stopper.text

        def answer():
            """The request's one response: its texts (decoded here, on the responder's thread) or its first error."""
            if errors:
                message, code = errors[0]
                response = error_response(message, code, relayed=relay_id is not None)
            else:
                try:
                    response = text_response([text_of(s, st) for s, st in zip(seqs, stoppers)], details, seqs)
                except Exception as exc:  # noqa: BLE001 - the client still gets an answer
                    response = error_response(f"generation failed: {exc}", FAILED, relayed=relay_id is not None)
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        def on_finish(seq, error):
            error = sequence_error(seq, error)
            if error:
                errors.append((error, error_code(seq)))
            pending[0] -= 1
            if pending[0] == 0:
                if relay_id is not None:
                    with self._relayed_lock:
                        self._relayed.pop(str(relay_id), None)
                self.responder.submit(answer)

        def watcher(stopper):
            """Look at each token's text for a stop string (only for prompts with stop strings)."""
            def on_token(seq, token):
                if stopper is None:
                    return False
                stopper.step(seq.generated)
                return stopper.stopped

            return on_token

        stoppers = [StopText(self.tokenizer, p.stop, min_tokens=p.sampling.min_tokens) if p.stop else None
                    for p in prompts]
        since = {} if arrived is None else {"arrived": arrived}
        seqs.extend(Sequence(p.prompt_ids, p.sampling, on_token=watcher(stopper), on_finish=on_finish,
                             cancelled=cancelled, timeout_s=timeout_s,
                             logprobs="cumulative_logprob" in details, **since)
                    for p, stopper in zip(prompts, stoppers))
        return seqs

    def _cancel_relayed(self, relay_id):
        """The relay's client went away: its sequences leave at the scheduler's next look. An unknown id has ended,
        or its request is still on its way here (the relay's cancel overtook it): remembered for that request."""
        with self._relayed_lock:
            gone = self._relayed.get(relay_id)
            if gone is None:
                self._cancelled_early[relay_id] = True
                while len(self._cancelled_early) > limits.RELAY_THREADS:
                    self._cancelled_early.popitem(last=False)
        if gone is not None:
            gone.set()

    def finalize(self):
        """Stop the scheduler: sequences still queued or running get an error; then send what the responder holds.
        Last, let the metrics go while this process can still tell Triton: a Triton metric left for the interpreter's
        exit is freed after the stub's shared memory, and took the stub down with a segfault at every unload
        (python_backend r24.10, ``Metric::SaveToSharedMemory``)."""
        self.scheduler.stop()
        self.responder.close()
        # NoMetrics, not None: a loop that outlived stop's wait (a long last step) still counts its events.
        self.scheduler.metrics = NoMetrics()
        self.metrics = None
        gc.collect()
