"""A small tritonclient (gRPC) client for the served models: the CLI's `local generate`, the tests, the bench.

It builds requests the way any Triton client would: ``text_input`` as BYTES of
shape [1, 1] plus the optional controls, each [1, 1].
"""

from __future__ import annotations

import queue
from typing import Iterator, Optional, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from .serving.limits import DETAILS


class ServingError(RuntimeError):
    """The server answered with an error."""


def generation_inputs(
    module,
    prompt: str,
    *,
    max_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    stream: Optional[bool] = None,
    stop: Sequence[str] = (),
    min_tokens: Optional[int] = None,
    ignore_eos: Optional[bool] = None,
    details: Sequence[str] = (),
    repetition_penalty: Optional[float] = None,
    presence_penalty: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
) -> list:
    """InferInput objects for ``tritonclient.grpc`` or ``tritonclient.http`` (pass the module). ``details``: outputs
    besides the text to ask for, from ``finish_reason``, ``num_input_tokens``, ``num_output_tokens``,
    ``cumulative_logprob``."""
    inputs = []

    def add(name: str, datatype: str, value) -> None:
        tensor = module.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)

    add("text_input", "BYTES", np.array([[prompt.encode("utf-8")]], dtype=np.object_))
    if max_tokens is not None:
        add("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32))
    if temperature is not None:
        add("temperature", "FP32", np.array([[temperature]], dtype=np.float32))
    if top_p is not None:
        add("top_p", "FP32", np.array([[top_p]], dtype=np.float32))
    if top_k is not None:
        add("top_k", "INT32", np.array([[top_k]], dtype=np.int32))
    if seed is not None:
        add("seed", "UINT64", np.array([[seed]], dtype=np.uint64))
    if stream is not None:
        add("stream", "BOOL", np.array([[stream]], dtype=bool))
    if stop:
        add("stop", "BYTES", np.array([[s.encode("utf-8") for s in stop]], dtype=np.object_))
    if min_tokens is not None:
        add("min_tokens", "INT32", np.array([[min_tokens]], dtype=np.int32))
    if ignore_eos is not None:
        add("ignore_eos", "BOOL", np.array([[ignore_eos]], dtype=bool))
    for name, value in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
        if value is not None:
            add(name, "FP32", np.array([[value]], dtype=np.float32))
    for name in details:
        add(f"return_{name}", "BOOL", np.array([[True]], dtype=bool))
    return inputs


def details_of(result) -> dict:
    """The detail outputs a response carries: {"finish_reason": "stop", "num_input_tokens": 5, ...}."""
    out = {}
    for name in DETAILS:
        value = result.as_numpy(name)
        if value is not None:
            value = value.reshape(-1)[0]
            out[name] = (value.decode("utf-8") if isinstance(value, bytes)
                         else float(value) if name == "cumulative_logprob" else int(value))
    return out


def text_of(result) -> str:
    """The completion in a response's ``text_output``."""
    value = result.as_numpy("text_output").reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class GenerationClient:
    """Unary calls to model NAME, streaming calls to NAME_stream, over gRPC.

    ``client_timeout_s``: the longest this client waits for a plain request's response, or for a whole stream
    (gRPC's deadline; None: as long as the server takes). A call that runs past it raises :class:`ServingError`
    and is cancelled, and the server frees its slot (model_repository/ENGINE_FORMAT.md). A request's
    ``request_timeout_s`` is the server's own bound instead, answered with an error from the server.
    """

    def __init__(self, url: str, model: str, client_timeout_s: Optional[float] = None):
        if client_timeout_s is not None and not client_timeout_s > 0:
            raise ValueError(f"client_timeout_s {client_timeout_s!r}: give the seconds to wait, more than 0, or None")
        self.model = model
        self.client_timeout_s = client_timeout_s
        self.client = grpcclient.InferenceServerClient(url)

    def generate(self, prompt: str, request_timeout_s: Optional[float] = None, **controls) -> str:
        """The whole completion; ``request_timeout_s``: the longest the server may take (its ``timeout``)."""
        return text_of(self._infer(generation_inputs(grpcclient, prompt, **controls), request_timeout_s))

    def generate_with_details(self, prompt: str, request_timeout_s: Optional[float] = None,
                              details: Sequence[str] = DETAILS, **controls) -> tuple[str, dict]:
        """The whole completion and the ``details`` asked for (see :func:`details_of`)."""
        result = self._infer(generation_inputs(grpcclient, prompt, details=details, **controls), request_timeout_s)
        return text_of(result), details_of(result)

    def _infer(self, inputs: list, request_timeout_s: Optional[float]):
        try:
            return self.client.infer(self.model, inputs, timeout=_micros(request_timeout_s),
                                     client_timeout=self.client_timeout_s)
        except InferenceServerException as exc:
            raise ServingError(self._message(exc)) from None

    def _message(self, exc: InferenceServerException) -> str:
        if self.client_timeout_s is not None and "DEADLINE_EXCEEDED" in str(exc.status()):
            return (f"no response within this client's {self.client_timeout_s:g} s (client_timeout_s); the request "
                    "was cancelled")
        return exc.message()

    def stream(self, prompt: str, timeout: float = 300.0, request_timeout_s: Optional[float] = None,
               **controls) -> Iterator[str]:
        """Yield the completion's pieces as the server makes them; ``timeout``: the longest wait for one piece here,
        ``request_timeout_s``: the longest the server may take over the whole request.

        A stream left before its end (an error, a ``timeout`` passed, a caller that stops reading) is cancelled, so
        the server frees its slot rather than finishing the completion."""
        pieces: "queue.Queue" = queue.Queue()

        def callback(result=None, error=None) -> None:
            pieces.put((result, error))

        def failure(error) -> ServingError:
            return ServingError(self._message(error) if isinstance(error, InferenceServerException) else str(error))

        ended = False
        self.client.start_stream(callback=callback, stream_timeout=self.client_timeout_s)
        try:
            try:
                self.client.async_stream_infer(
                    f"{self.model}_stream",
                    generation_inputs(grpcclient, prompt, stream=True, **controls),
                    enable_empty_final_response=True,
                    timeout=_micros(request_timeout_s),
                )
            except InferenceServerException as exc:
                # The stream failed before the request went out (its deadline passed first, on a busy machine): its
                # cause reaches the callback, just after tritonclient marks the stream failed.
                try:
                    raise failure(pieces.get(timeout=5.0)[1] or exc) from None
                except queue.Empty:
                    raise failure(exc) from None
            while True:
                try:
                    result, error = pieces.get(timeout=timeout)
                except queue.Empty:
                    raise ServingError(f"no response for {timeout:g} s (the stream's timeout); the request was "
                                       "cancelled") from None
                if error is not None:
                    raise failure(error)
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if result.as_numpy("text_output") is not None:
                    piece = text_of(result)
                    if piece:
                        yield piece
                if final is not None and final.bool_param:
                    ended = True
                    return
        finally:
            self.client.stop_stream(cancel_requests=not ended)

    def close(self) -> None:
        self.client.close()


def _micros(seconds: Optional[float]) -> Optional[int]:
    """A request timeout as tritonclient sends it (whole microseconds, at least 1), or None for none."""
    return None if seconds is None else max(1, round(seconds * 1e6))
