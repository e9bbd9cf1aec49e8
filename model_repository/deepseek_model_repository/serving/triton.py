"""What the Python models share inside Triton (imported only there: it needs the stub's utils)."""

import faulthandler
import json
import re
import signal
import threading

import triton_python_backend_utils as pb_utils

from . import scheduler
from .limits import parameter_timeout_us

#: The signal that makes a text-generation model's process print every thread's stack to Triton's log.
DUMP_SIGNAL = signal.SIGUSR1


#: The error codes these models answer with (``pb_utils.TritonError``'s names): a bad request (HTTP 400, gRPC
#: INVALID_ARGUMENT), a request whose own timeout passed (as Triton answers one whose timeout passed in its queue)
#: or that the server ended as it stopped (UNAVAILABLE: a client may retry), anything else, and a request whose
#: client went away (its final response, which Triton needs all the same).
BAD_REQUEST, TIMED_OUT, FAILED, CANCELLED = "INVALID_ARG", "UNAVAILABLE", "INTERNAL", "CANCELLED"
CODES = (BAD_REQUEST, TIMED_OUT, FAILED, CANCELLED)
#: A relayed request's error goes back to the relay as "[CODE] message": Triton 2.51 hands a BLS caller an error's
#: message without its code, and the relay answers its client with that code (:func:`relayed_error`).
_RELAYED = re.compile(r"\[(" + "|".join(CODES) + r")\] ")


def error_response(message, code=BAD_REQUEST, relayed=False):
    """An error response with ``code`` (one of :data:`CODES`); ``relayed``: for the relay, the code in the message."""
    if relayed:
        message = f"[{code}] {message}"
    value = getattr(pb_utils.TritonError, code, None)
    error = pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message, value)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def error_code(seq):
    """The error code of a sequence (``serving.scheduler.Sequence``) that ended with an error: by its outcome, and
    UNAVAILABLE (try again, on another replica) for one the server ended as it stopped."""
    if seq.server_stopping:
        return TIMED_OUT
    return {scheduler.TIMED_OUT: TIMED_OUT, scheduler.CANCELLED: CANCELLED}.get(seq.outcome, FAILED)


#: The message of a cancelled request's final response (its client, gone, does not see it).
CANCELLED_MESSAGE = "the request was cancelled: its client went away"


def sequence_error(seq, error):
    """The error a finished sequence is answered with (``on_finish``'s ``error``), or None: a cancelled one's is
    :data:`CANCELLED_MESSAGE`."""
    return CANCELLED_MESSAGE if seq.outcome == scheduler.CANCELLED else error


def relayed_error(message):
    """(code, message) of an error the scheduler model answered a relayed request with (FAILED if it names none)."""
    found = _RELAYED.match(message)
    return (found.group(1), message[found.end():]) if found else (FAILED, message)


def request_timeout_us(request):
    """The request's own timeout in microseconds, 0 for none: Triton's (tritonclient's ``timeout``), else the
    ``timeout`` field of a ``generate`` request (``limits.TIMEOUT_PARAMETER``; a bad one raises ``RequestError``)."""
    own = request.timeout() if hasattr(request, "timeout") else 0
    return own or parameter_timeout_us(request)


def request_timeout_s(request):
    """The request's own timeout in seconds, or None."""
    micros = request_timeout_us(request)
    return micros / 1e6 if micros else None


#: Held while this process asks Triton whether a client went away: one question at a time, whichever sender. A
#: second question about a sender whose first is still out waits for that one's answer, which may have been asked
#: before the second's mark (:func:`client_gone`).
_ASKING = threading.Lock()


class _Held:
    """Finished BLS response iterators this process still holds (:func:`decoupled_responses`), oldest first: each is
    let go once a question asked after it was held has come back from Triton (:func:`client_gone`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.iterators = []
        self.held = self.released = 0  # how many ever held, and let go

    def hold(self, iterator):
        with self.lock:
            self.iterators.append(iterator)
            self.held += 1

    def mark(self):
        """Where the held iterators end now (a question about to be asked)."""
        with self.lock:
            return self.held

    def let_go(self, mark):
        """Drop those held before ``mark``, outside the lock: an iterator freed before its last response waits for
        it."""
        with self.lock:
            count = mark - self.released
            if count <= 0:
                return
            released = self.iterators[:count]
            del self.iterators[:count]
            self.released += count
        del released


_HELD = _Held()


def decoupled_responses(request):
    """Every response of a decoupled BLS call (``request.exec(decoupled=True)``), once the last has come.

    The stub of Triton 2.51 (python_backend r24.10) holds a reference to each BLS call's response iterator, and drops
    it on its stub-to-parent thread without the GIL, in turn behind the questions queued there. Where that reference
    is the last, the numpy arrays of the responses' tensors are freed without the GIL, which corrupts the
    interpreter's heap: the relay's stub died of it (SIGSEGV, now here and now there) under bursts of plain requests,
    while its watcher's questions kept that thread busy (measured: a model that drops its iterators that way dies
    within a few hundred requests, ``tests/integration/test_bls_lifetime.py``; python_backend holds the GIL there
    from r24.12). So this process keeps the iterator until that thread has let go of it: it does its work in order,
    so once a question enqueued after the call ended has been answered, it has, and the iterator's last reference is
    this process's, dropped with the GIL."""
    iterator = request.exec(decoupled=True)
    try:
        return list(iterator)
    finally:
        _HELD.hold(iterator)


def client_gone(sender):
    """A check of whether the client of ``sender``'s request went away (never, where this Triton cannot tell).

    Each call is a round trip to Triton's process (one at a time in this process, :data:`_ASKING`), and must not
    come after the request's final response. One answered "no" has been through the stub-to-parent thread (a "yes"
    may be the sender's cached one), so the iterators held before it was asked are let go
    (:func:`decoupled_responses`)."""
    if not hasattr(sender, "is_cancelled"):
        return lambda: False

    def gone():
        with _ASKING:
            mark = _HELD.mark()
            cancelled = sender.is_cancelled()
        if not cancelled:
            _HELD.let_go(mark)
        return cancelled

    return gone


def model_parameters(args):
    """(model config, its string parameters) from ``initialize``'s args."""
    config = json.loads(args["model_config"])
    return config, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def dump_threads_on_signal():
    """``kill -USR1 <the model's stub process>`` prints the stack of each of its threads to Triton's log (the stubs
    write there), without stopping it: what a stuck request waits on. Stubs are the processes named
    ``triton_python_backend_stub``, one per model instance, whose arguments name the model's ``model.py``
    (``serving.processes`` finds them).  And a stub that crashes (a segfault in a native library, say) prints them
    there as it dies, so that its log says where."""
    faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=False)
    faulthandler.enable(all_threads=True)
