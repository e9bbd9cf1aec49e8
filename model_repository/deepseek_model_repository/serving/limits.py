"""Text-generation requests: their inputs, and the limits checked before any work is done on them.

A request's size is bounded before it is tokenized: its text may not be longer, in bytes, than
the longest token of the vocabulary times the context, so no text that could never fit is ever
tokenized.  Then the prompt's tokens are checked against the context and ``max_tokens`` is cut
to the room left.  Fields a request sends that the model does not take are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .sampling import Sampling

#: Outputs of the text-generation models: the completion, and what a request may ask about it with the BOOL input
#: ``return_<name>`` (the names of Triton's vLLM backend, so its clients work here): how it ended (``stop``,
#: ``length`` or ``cancelled``, as ``deepseek_scheduler_sequences_ended_total`` labels them; on the final
#: response), its prompt's tokens, the tokens each response's text covers (as the vLLM backend counts them: a
#: stream's add up to its completion's), and the sum of its tokens' log-probabilities so far (under the model's raw
#: distribution, before temperature, top-k or top-p), on every response.
GENERATION_OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_output", "TYPE_STRING", (1,)),
    ("finish_reason", "TYPE_STRING", (1,)),
    ("num_input_tokens", "TYPE_UINT32", (1,)),
    ("num_output_tokens", "TYPE_UINT32", (1,)),
    ("cumulative_logprob", "TYPE_FP32", (1,)),
)
OUTPUT_NAMES = tuple(name for name, *_ in GENERATION_OUTPUTS)
DETAILS = OUTPUT_NAMES[1:]
#: Inputs of the client-facing text-generation models.
GENERATION_INPUTS: tuple[tuple[str, str, bool, tuple[int, ...]], ...] = (
    # name, Triton data type, optional, dims (without the batch dimension)
    ("text_input", "TYPE_STRING", False, (1,)),
    ("max_tokens", "TYPE_INT32", True, (1,)),
    ("temperature", "TYPE_FP32", True, (1,)),
    ("top_p", "TYPE_FP32", True, (1,)),
    ("top_k", "TYPE_INT32", True, (1,)),
    ("seed", "TYPE_UINT64", True, (1,)),
    ("stream", "TYPE_BOOL", True, (1,)),
    ("stop", "TYPE_STRING", True, (-1,)),  # stop strings, for every prompt of the request
    ("min_tokens", "TYPE_INT32", True, (1,)),  # no end-of-sentence token, nor a stop string, ends it before this many
    ("ignore_eos", "TYPE_BOOL", True, (1,)),  # the end-of-sentence token does not end the completion
    ("repetition_penalty", "TYPE_FP32", True, (1,)),  # > 0; 1 is none (tokens of the prompt and the completion)
    ("presence_penalty", "TYPE_FP32", True, (1,)),  # -2..2; 0 is none (tokens of the completion)
    ("frequency_penalty", "TYPE_FP32", True, (1,)),  # -2..2; 0 is none (per occurrence in the completion)
    *((f"return_{name}", "TYPE_BOOL", True, (1,)) for name in DETAILS),
)
INPUT_NAMES = tuple(name for name, *_ in GENERATION_INPUTS)
INT32_MAX = 2**31 - 1
#: Stop strings a request may send, and the UTF-8 bytes of each.
MAX_STOPS, MAX_STOP_BYTES = 16, 256
#: Request parameters between the relay (``NAME``) and the scheduler model (``NAME_stream``).  The relay names each
#: request it passes on (``RELAY_ID``); when that request's client goes away it sends a request that names it
#: again (``CANCEL_RELAYED``), and the scheduler drops its sequences.  (Triton cancels the relay's request, not the
#: one the relay made, and the Python backend of Triton 2.51 cannot cancel a request it made.)
RELAY_ID = "deepseek_relay_id"
CANCEL_RELAYED = "deepseek_cancel_relayed"
#: When the relay took the request (``time.monotonic_ns()``, one clock for every process of the machine): its wait
#: for a relay thread counts in its timeout and its time to first token.
RELAY_ARRIVED = "deepseek_relay_arrived_ns"
RELAY_PARAMETERS = (RELAY_ID, CANCEL_RELAYED, RELAY_ARRIVED)
#: A request that asks only whether the model's processes answer (``deepseek_model_repository.probe``, the Triton
#: pods' liveness probe): the relay passes it to the scheduler model, and each answers it in ``execute``, waiting for
#: no slot.
#: Triton itself reports a model ready whose process died, and fails each of its requests.
PING = "deepseek_ping"
#: What Triton 2.51 answers every new request to a model whose process died with ("Stub process 'NAME_0_0' is not
#: healthy."); it never answers the requests that process held.  So while plain requests are in flight, the relay
#: pings the scheduler model every :data:`SCHEDULER_CHECK_S` seconds, and on this answers the ones it holds itself.
DEAD_PROCESS = "is not healthy"
SCHEDULER_CHECK_S = 2.0
#: A request's own timeout, in microseconds, as a request parameter: what Triton's HTTP ``infer`` reads from its JSON
#: ``parameters`` (tritonclient's ``timeout=``, which Triton applies itself and does not pass on), and what a
#: ``generate`` or ``generate_stream`` request sends as a field of its JSON body, which Triton passes on to the model.
TIMEOUT_PARAMETER = "timeout"
#: The longest such timeout: the largest integer a request parameter holds (Triton's are int64).
MAX_TIMEOUT_US = 2**63 - 1
#: Plain requests the relay passes on at once, per replica; more wait in the relay until one ends (their wait counts
#: in their timeouts, :data:`RELAY_ARRIVED`).  Each holds one
#: of the relay's threads, and one of the Python backend's own threads in Triton's process (its BLS call waits
#: there for the final response), so the backend's thread pool is sized from this too (``config.server_flags``).
RELAY_THREADS = 256


class RequestError(Exception):
    """A bad request: answered with this message (INVALID_ARG), other requests go on."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry."""

    max_sequence_length: int
    #: No text longer than this can fit the context (the vocabulary's longest token x the context).
    max_text_bytes: int

    @classmethod
    def for_tokenizer(cls, tokenizer, max_sequence_length: int) -> "RequestLimits":
        longest = max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=16)
        return cls(max_sequence_length, max_sequence_length * max(longest, 1))


@dataclass(frozen=True)
class Prompt:
    """One checked prompt of a request."""

    prompt_ids: list[int]
    sampling: Sampling
    #: Generation ends at the first of these in the completion's text, which stops before it.
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedRequest:
    prompts: list[Prompt]
    stream: bool
    #: The outputs of :data:`DETAILS` the request asked for.
    details: tuple[str, ...] = ()

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0].prompt_ids

    @property
    def sampling(self) -> Sampling:
        return self.prompts[0].sampling


def process_died(error: str) -> bool:
    """Whether ``error``, Triton's answer to a request, says that the model's process died (:data:`DEAD_PROCESS`)."""
    return DEAD_PROCESS in error


def request_parameters(request) -> dict:
    """A request's parameters (Triton's HTTP ``generate`` passes unknown JSON keys as these); {} if none or unreadable."""
    raw = request.parameters() if hasattr(request, "parameters") else ""
    try:
        params = json.loads(raw) if raw else {}
    except (TypeError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def arrival(params: dict, now: float) -> float:
    """When a request arrived, in ``time.monotonic()`` seconds: when the relay took it (:data:`RELAY_ARRIVED`), or
    ``now``; never later than ``now``."""
    taken = params.get(RELAY_ARRIVED)
    if isinstance(taken, bool) or not isinstance(taken, int):
        return now
    return min(now, taken / 1e9)


def unknown_fields(request, allowed: tuple[str, ...] = ()) -> list[str]:
    """Request parameters the model does not take (``allowed``: parameters it takes besides Triton's own and
    :data:`TIMEOUT_PARAMETER`)."""
    return sorted(k for k in request_parameters(request)
                  if not k.startswith("triton_") and k != TIMEOUT_PARAMETER and k not in allowed)


def check_fields(request, allowed: tuple[str, ...] = ()) -> None:
    unknown = unknown_fields(request, allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}: this model takes {', '.join(INPUT_NAMES)}, and "
                           f"{TIMEOUT_PARAMETER} (microseconds)")


def stream_refused(model_name: str, stream_model: str) -> RequestError:
    """The error for ``stream`` true sent to a model that answers in one response."""
    return RequestError(f"stream is true but model '{model_name}' answers in one response: for tokens as they are "
                        f"made, call model '{stream_model}' (gRPC streaming, or HTTP generate_stream)")


def parameter_timeout_us(request) -> int:
    """The request's :data:`TIMEOUT_PARAMETER` in microseconds, checked; 0 when it sends none."""
    value = request_parameters(request).get(TIMEOUT_PARAMETER)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TIMEOUT_US:
        raise RequestError(f"{TIMEOUT_PARAMETER} must be a whole number of microseconds from 1 to {MAX_TIMEOUT_US}, "
                           f"got {value!r}")
    return value


def _values(pb_utils, request, name, n, default, cast, check):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return [default] * n
    values = tensor.as_numpy().reshape(-1)
    if values.size not in (1, n):
        raise RequestError(f"{name} has {values.size} values for {n} prompts: send one, or one per prompt")
    out = []
    for raw in values:
        value = cast(raw)
        problem = check(value)
        if problem:
            raise RequestError(f"{name} {problem}, got {raw}")
        out.append(value)
    return out * n if values.size == 1 else out


def stop_strings(pb_utils, request) -> tuple[str, ...]:
    """The request's ``stop`` strings, checked (at most :data:`MAX_STOPS`, each 1 to :data:`MAX_STOP_BYTES` bytes of
    UTF-8), duplicates dropped; () when it sends none."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop")
    if tensor is None:
        return ()
    raw = list(tensor.as_numpy().reshape(-1))
    if len(raw) > MAX_STOPS:
        raise RequestError(f"stop has {len(raw)} strings: send at most {MAX_STOPS}")
    stops = []
    for value in raw:
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if not data:
            raise RequestError("stop holds an empty string: send only non-empty stop strings")
        if len(data) > MAX_STOP_BYTES:
            raise RequestError(f"a stop string is {len(data)} bytes: send stop strings of at most {MAX_STOP_BYTES}")
        try:
            stops.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("stop strings must be UTF-8 text") from None
    return tuple(dict.fromkeys(stops))


def parse_generation_request(request, limits: RequestLimits, tokenizer, default_max_tokens: int, pb_utils,
                             model_name: str, *, streaming_model: bool = True) -> ParsedRequest:
    """The prompts of one request to the scheduler model (which takes the relay's parameters), checked cheapest first;
    RequestError names what is wrong."""
    check_fields(request, RELAY_PARAMETERS)
    text = pb_utils.get_input_tensor_by_name(request, "text_input")
    if text is None:
        raise RequestError("missing input 'text_input' (BYTES, shape [1, 1]): send the prompt as text_input")
    raw_prompts = list(text.as_numpy().reshape(-1))
    if not raw_prompts:
        raise RequestError("text_input holds no prompt")
    for raw in raw_prompts:
        size = len(raw) if isinstance(raw, (bytes, str)) else 0
        if size > limits.max_text_bytes:
            raise RequestError(f"text_input is {size} bytes; no text over {limits.max_text_bytes} bytes fits this "
                               f"model's context of {limits.max_sequence_length} tokens: shorten the prompt")
    n = len(raw_prompts)
    max_tokens = _values(pb_utils, request, "max_tokens", n, default_max_tokens, int,
                         lambda v: None if 1 <= v <= INT32_MAX else "must be at least 1")
    temperature = _values(pb_utils, request, "temperature", n, 0.0, float,
                          lambda v: None if v >= 0 and v == v and v != float("inf") else "must be 0 (greedy) or positive")
    top_p = _values(pb_utils, request, "top_p", n, 1.0, float,
                    lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]")
    top_k = _values(pb_utils, request, "top_k", n, 0, int, lambda v: None if v >= 0 else "must be 0 (off) or positive")
    seed = _values(pb_utils, request, "seed", n, None, int, lambda v: None)
    stream = _values(pb_utils, request, "stream", n, False, bool, lambda v: None)
    if any(stream) and not streaming_model:
        raise stream_refused(model_name, f"{model_name}_stream")
    if any(stream) and n != 1:
        raise RequestError("stream is true: send one prompt per request")
    min_tokens = _values(pb_utils, request, "min_tokens", n, 0, int,
                         lambda v: None if 0 <= v <= INT32_MAX else "must be 0 or more")
    ignore_eos = _values(pb_utils, request, "ignore_eos", n, False, bool, lambda v: None)
    repetition = _values(pb_utils, request, "repetition_penalty", n, 1.0, float,
                         lambda v: None if 0 < v < float("inf") else "must be positive (1 is no penalty)")
    presence = _values(pb_utils, request, "presence_penalty", n, 0.0, float,
                       lambda v: None if -2.0 <= v <= 2.0 else "must be between -2 and 2")
    frequency = _values(pb_utils, request, "frequency_penalty", n, 0.0, float,
                        lambda v: None if -2.0 <= v <= 2.0 else "must be between -2 and 2")
    for row in range(n):
        if min_tokens[row] > max_tokens[row]:
            raise RequestError(f"min_tokens {min_tokens[row]} is more than max_tokens {max_tokens[row]}: send a "
                               "min_tokens of at most max_tokens")
    stop = stop_strings(pb_utils, request)
    details = tuple(name for name in DETAILS
                    if any(_values(pb_utils, request, f"return_{name}", n, False, bool, lambda v: None)))
    prompts = []
    for row, raw in enumerate(raw_prompts):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError("text_input must be UTF-8 text") from None
        prompt = str(raw)
        if prompt == "":
            raise RequestError("text_input is empty: send a non-empty prompt")
        ids = tokenizer.encode(prompt).ids
        if not ids:
            raise RequestError("text_input tokenizes to no tokens: send a non-empty prompt")
        if len(ids) >= limits.max_sequence_length:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model's maxSequenceLength is {limits.max_sequence_length}, "
                "which must leave room for at least one new token: shorten the prompt"
            )
        room = limits.max_sequence_length - len(ids)
        most = min(max_tokens[row], room)  # prompt and completion fit the context
        prompts.append(Prompt(ids, Sampling(most, temperature[row], top_p[row], top_k[row], seed[row],
                                            min_tokens=min(min_tokens[row], most), ignore_eos=ignore_eos[row],
                                            repetition_penalty=repetition[row], presence_penalty=presence[row],
                                            frequency_penalty=frequency[row]),
                              stop))
    return ParsedRequest(prompts, bool(stream[0]), details)
