"""What the text-generation Python models share inside Triton (imported only there: it needs the stub's utils)."""

import faulthandler
import json
import signal

import triton_python_backend_utils as pb_utils

#: The signal that makes a text-generation model's process print every thread's stack to Triton's log.
DUMP_SIGNAL = signal.SIGUSR1


def error_response(message, invalid=True):
    """An error response; a bad request is INVALID_ARG (HTTP 400), anything else INTERNAL."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def client_gone(sender):
    """A check of whether the client of ``sender``'s request went away (never, where this Triton cannot tell).

    Each call is a round trip to Triton's process, and must not come after the request's final response."""
    return sender.is_cancelled if hasattr(sender, "is_cancelled") else (lambda: False)


def model_parameters(args):
    """(model config, its string parameters) from ``initialize``'s args."""
    config = json.loads(args["model_config"])
    return config, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def dump_threads_on_signal():
    """``kill -USR1 <the model's stub process>`` prints the stack of each of its threads to Triton's log (the stubs
    write there), without stopping it: what a stuck request waits on. Stubs are the processes named
    ``triton_python_backend_stub``, one per model instance, whose arguments name the model's ``model.py``
    (``serving.processes`` finds them)."""
    faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=False)
