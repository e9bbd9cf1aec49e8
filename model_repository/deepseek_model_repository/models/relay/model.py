"""The client-facing text-generation model (``NAME``): plain requests, relayed to the scheduler.

Triton refuses decoupled models on HTTP ``infer`` and unary gRPC, so the scheduler lives in the
decoupled ``NAME_stream`` and this model gives it a plain face: ``execute`` hands each request to
a thread and returns at once; the thread sends the request to ``NAME_stream`` (one BLS request,
not one per token: a request without ``stream`` gets its whole completion in one response) and
answers through the request's response sender.  So a plain request joins the running batch
between two decode steps instead of waiting for a dynamic batch to finish.

A watcher thread asks each relayed request's client whether it went away, every
``CLIENT_POLL_S`` as the scheduler does for its own clients; for one that did, it sends
``NAME_stream`` a request that names the relayed one (``limits.CANCEL_RELAYED``), which frees its slot.

While requests are in flight, a second thread pings ``NAME_stream`` every ``limits.SCHEDULER_CHECK_S``: Triton
never answers the requests held by a model process that died, so if the ping says that ``NAME_stream``'s did, the
relay answers them itself (UNAVAILABLE: retry), instead of leaving their clients to wait until the pod restarts.

A request with ``limits.PING`` (the pods' liveness probe, ``deepseek_model_repository.probe``) is answered in
``execute`` once ``NAME_stream`` has answered one too: both processes are alive.

Each BLS call's responses come through ``serving.triton.decoupled_responses``, which keeps them until the stub has
let go of them too: Triton 2.51's stub drops its reference without the GIL, and this model's stub died of that under
bursts of plain requests. So a relayed request's answer carries only the outputs its client asked for (the stub
would drop the others while it sends, without the GIL too), and a ping's sender is asked once before it is answered,
which lets the ping's responses go when no request is in flight.
"""

import gc
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from deepseek_model_repository.serving import limits, metrics
from deepseek_model_repository.serving.processes import announce_initialized
from deepseek_model_repository.serving.scheduler import CLIENT_POLL_S
from deepseek_model_repository.serving.triton import (CANCELLED, CANCELLED_MESSAGE, FAILED, TIMED_OUT, client_gone,
                                                      decoupled_responses, dump_threads_on_signal, error_response,
                                                      model_parameters, relayed_error, request_timeout_us)

log = logging.getLogger("deepseek_model_repository.relay")


def _empty_text(name):
    return pb_utils.Tensor(name, np.array([[b""]], dtype=np.object_))


class Relayed:
    """A request in flight: its response sender, the check of its client (``client_gone``), the inputs passed on and
    the outputs its client asked for.

    ``lock`` is held while a thread asks and while ``answered`` is set, before the final response: a sender must not
    be asked after its final response (Triton has freed what it asks), and gets one final response, from whichever
    thread sets ``answered`` (the relay's, or the scheduler check's when ``NAME_stream`` died). The process asks one
    question at a time (``serving.triton.client_gone``).
    """

    def __init__(self, sender, inputs, requested):
        self.sender = sender
        self.gone = client_gone(sender)
        self.inputs = inputs
        self.requested = frozenset(requested)
        self.lock = threading.Lock()
        self.answered = False

    def client_left(self):
        """Whether its client went away; None once it was answered (it must not be asked then)."""
        with self.lock:
            return None if self.answered else self.gone()

    def answer(self, response):
        """Send ``response`` as the request's final response, unless another thread did already. Its tensors are
        those its client asked for: the stub would drop the others while it sends, without the GIL (see
        ``serving.triton.decoupled_responses``)."""
        with self.lock:
            if self.answered:
                return
            self.answered = True
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class TritonPythonModel:
    """Relay to the scheduler model named by the ``scheduler_model`` parameter."""

    def initialize(self, args):
        """Note the scheduler model; the relay threads wait on it, so there are as many as requests can queue."""
        dump_threads_on_signal()
        config, params = model_parameters(args)
        self.model_name = config["name"]
        self.target = params["scheduler_model"]
        self.threads = int(params.get("relay_threads", limits.RELAY_THREADS))
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="relay")
        #: Requests handed to the pool and not finished, and those of them that wait for a relay thread: the latter
        #: are published in the scheduler's queue series (``deepseek_scheduler_requests_waiting{waiting_in="relay"}``),
        #: so that the autoscalers' queue signal counts them too. Each change is a round trip to Triton, so only the
        #: changes while some wait.
        self.active = self.backlog = 0
        self.backlog_lock = threading.Lock()
        waiting = pb_utils.MetricFamily(name=f"deepseek_scheduler_{metrics.WAITING_NAME}",
                                        description=metrics.WAITING_HELP, kind=pb_utils.MetricFamily.GAUGE)
        self.waiting_metrics = (waiting, waiting.Metric(labels={"model": self.model_name,
                                                                **metrics.RELAY_WAITING_LABEL}))
        #: Answers the liveness probe's pings, off execute's thread: a ping waits for NAME_stream's answer, and
        #: the requests behind it in Triton's queue for this model must not.
        self.pinger = ThreadPoolExecutor(max_workers=2, thread_name_prefix="relay-ping")
        #: Relay id -> each request in flight (``Relayed``).
        self.inflight = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="relay-client-watch", daemon=True)
        self.watcher.start()
        #: What Triton answered the scheduler check with once ``NAME_stream``'s process died, else None.
        self.died = None
        self.checker = threading.Thread(target=self._check_scheduler, name="relay-scheduler-check", daemon=True)
        self.checker.start()
        announce_initialized(args)

    def execute(self, requests):
        """Check what can be checked without the scheduler, then relay each request from a thread."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            if limits.PING in limits.request_parameters(request):
                self.pinger.submit(self._answer_ping, sender)
                continue
            try:
                limits.check_fields(request)
                stream = pb_utils.get_input_tensor_by_name(request, "stream")
                if stream is not None and bool(stream.as_numpy().reshape(-1).any()):
                    raise limits.stream_refused(self.model_name, self.target)
                # Copies: the request's own tensors are not used after execute returns.
                inputs = [pb_utils.Tensor(name, tensor.as_numpy().copy())
                          for name in limits.INPUT_NAMES
                          if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None]
                timeout = request_timeout_us(request)
                requested = request.requested_output_names()  # every output, where the client named none
            except limits.RequestError as exc:
                sender.send(error_response(str(exc)), flags=final)
                continue
            with self.backlog_lock:
                waits = self.active >= self.threads  # no relay thread is free for it
                self.active += 1
                if waits:
                    self.backlog += 1
                    self._publish_backlog()
            self.pool.submit(self._relay, inputs, sender, requested, timeout, time.monotonic_ns(), waits)
        return None

    def _publish_backlog(self):
        """Under ``backlog_lock`` (so that the values reach Triton in order)."""
        try:
            self.waiting_metrics[1].set(self.backlog)
        except Exception:  # noqa: BLE001 - a metric is never worth a request
            log.warning("publishing the relay's backlog failed", exc_info=True)

    def _answer_ping(self, sender):
        try:
            answer = self._ping()
            client_gone(sender)()  # lets the ping's responses go (serving.triton.decoupled_responses), when idle too
            sender.send(answer, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - the probe sees no answer and fails, which is what it is for
            log.warning("could not answer a liveness ping", exc_info=True)

    def _ping(self):
        """The liveness probe's answer: an empty text once the scheduler model has answered a ping too, else the
        error of the model that did not answer."""
        error = self._ask_scheduler()
        if error is not None:
            return error_response(f"model {self.target} does not answer: {error}", FAILED)
        return pb_utils.InferenceResponse(output_tensors=[_empty_text("text_output")])

    def _ask_scheduler(self):
        """Ping the scheduler model (it answers in ``execute``, behind only the requests ahead of it in Triton's
        queue, which it hands on at once, and before any slot): None once it answered, else the error."""
        try:
            ping = pb_utils.InferenceRequest(
                model_name=self.target, requested_output_names=["text_output"], parameters={limits.PING: True},
                inputs=[_empty_text("text_input")])
            for response in decoupled_responses(ping):
                if response.has_error():
                    return response.error().message()
        except Exception as exc:  # noqa: BLE001 - the caller says what failed
            return str(exc) or type(exc).__name__
        return None

    def _died_error(self, error):
        return error_response(
            f"model {self.target}'s process died ({error}), and Triton does not start it again: the pod's liveness "
            "probe restarts the server (locally: deepseek-operator local down, then local up); retry the request",
            TIMED_OUT)  # UNAVAILABLE: another replica, or this one once restarted, can answer it

    def _check_scheduler(self):
        """Every ``limits.SCHEDULER_CHECK_S`` while requests are in flight: once the scheduler model's process has
        died, answer the requests it held, which Triton never will (a ping that hangs holds only this thread)."""
        while not self.stopped.wait(limits.SCHEDULER_CHECK_S):
            with self.lock:
                if not self.inflight:
                    continue
            error = self._ask_scheduler()
            if error is None or not limits.process_died(error):
                continue
            self.died = error
            with self.lock:
                held = list(self.inflight.values())
                self.inflight.clear()
            log.error("model %s's process died (%s): answering the %d requests it held", self.target, error, len(held))
            for relayed in held:
                try:
                    relayed.answer(self._died_error(error))
                except Exception:  # noqa: BLE001 - the others are still answered
                    log.warning("could not answer a request that %s held", self.target, exc_info=True)

    def _relay(self, inputs, sender, requested, timeout=0, arrived_ns=None, waited=False):
        """Pass the request on (with its own timeout, in microseconds, and when it came: its wait for this thread
        counts in that timeout), and its answer, with the outputs its client asked for (``requested``), or its error
        back; ``waited``: it was counted in the backlog."""
        if waited:
            with self.backlog_lock:
                self.backlog -= 1
                self._publish_backlog()
        try:
            self._pass_on(inputs, sender, timeout, arrived_ns, requested)
        finally:
            with self.backlog_lock:
                self.active -= 1

    def _pass_on(self, inputs, sender, timeout, arrived_ns, requested):
        answer = None
        relay_id = uuid.uuid4().hex
        relayed = Relayed(sender, inputs, requested)
        with self.lock:
            self.inflight[relay_id] = relayed
        try:
            # It waited for a relay thread, and its client gave up meanwhile (None: the scheduler check answered it,
            # and NAME_stream answers at once that its process died).
            if relayed.client_left():
                answer = error_response(CANCELLED_MESSAGE, CANCELLED)
            else:
                request = pb_utils.InferenceRequest(model_name=self.target, inputs=inputs,
                                                    requested_output_names=list(limits.OUTPUT_NAMES),
                                                    parameters={limits.RELAY_ID: relay_id,
                                                                limits.RELAY_ARRIVED: arrived_ns or time.monotonic_ns()},
                                                    timeout=timeout)
                # A plain request's completion comes in one response: watched meanwhile.
                for response in decoupled_responses(request):
                    if response.has_error():
                        code, message = relayed_error(response.error().message())
                        answer = (self._died_error(message) if limits.process_died(message)
                                  else error_response(message, code))
                    elif response.output_tensors():
                        answer = pb_utils.InferenceResponse(output_tensors=[
                            tensor for tensor in response.output_tensors() if tensor.name() in relayed.requested])
        except Exception as exc:  # noqa: BLE001 - answer the client whatever happened
            answer = error_response(f"generation failed: {exc}", FAILED)
        finally:
            with self.lock:
                self.inflight.pop(relay_id, None)
        # Not sent if the scheduler check answered it already (NAME_stream died, and this answer came after all).
        relayed.answer(answer or error_response("the scheduler gave no answer", FAILED))

    def _watch(self):
        """Every ``CLIENT_POLL_S``: tell the scheduler model about each relayed request whose client went away."""
        while not self.stopped.wait(CLIENT_POLL_S):
            with self.lock:
                inflight = list(self.inflight.items())
            for relay_id, relayed in inflight:
                try:
                    if not relayed.client_left():
                        continue
                    with self.lock:
                        if self.inflight.pop(relay_id, None) is None:
                            continue  # answered meanwhile
                    # The relayed request's own inputs, so the cancel passes Triton's checks of NAME_stream's inputs.
                    cancel = pb_utils.InferenceRequest(model_name=self.target, inputs=relayed.inputs,
                                                       requested_output_names=["text_output"],
                                                       parameters={limits.CANCEL_RELAYED: relay_id})
                    decoupled_responses(cancel)
                except Exception:  # noqa: BLE001 - that request then runs to its end; the others are still watched
                    log.warning("could not pass on that a client went away", exc_info=True)

    def finalize(self):
        """Let relayed requests finish (but for those a dead ``NAME_stream`` held, answered already: their threads
        wait for ever)."""
        self.stopped.set()
        self.watcher.join(5)
        self.checker.join(5)
        self.pinger.shutdown(wait=True)
        self.pool.shutdown(wait=self.died is None, cancel_futures=False)
        self.waiting_metrics = None  # freed while the stub can still tell Triton (see the scheduler model's finalize)
        gc.collect()
