"""Text generation: text in, completion out, batched across requests, with the engine's KV cache.

One ``execute`` receives every request Triton's dynamic batcher gathered.  Their
prompts are left-padded into one batch; one prefill and then one decode step per
token run on the engine model (BLS), each step feeding back the engine's
``present.*`` tensors as ``past_key_values.*``.  Rows that finish leave the
batch.  Padding is masked and ``position_ids`` count real tokens only, so a
request's greedy completion is the one it would get alone.

In decoupled mode (the ``NAME_stream`` model) a request with ``stream`` true gets
one response per new piece of text, then a final empty one.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64}


class RequestError(Exception):
    """A bad request: answered with this message, the rest of the batch goes on."""


class Sequence:
    """One prompt being completed (a request may carry several rows)."""

    def __init__(self, request_index, row, prompt_ids, max_new, temperature, top_p, top_k, seed, stream):
        self.request_index = request_index
        self.row = row
        self.prompt_ids = prompt_ids
        self.max_new = max_new
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.rng = np.random.default_rng(seed)
        self.stream = stream
        self.generated = []
        self.sent_text = ""
        self.done = False


def load_tokenizer(engine_dir, info):
    """The engine's tokenizer through the `tokenizers` library (no transformers inside Triton).

    Special tokens (a BOS, say) come from tokenizer.json's post-processor, exactly as
    transformers' fast tokenizer that saved it applies them.
    """
    tok_dir = os.path.join(engine_dir, info.get("tokenizer_dir", "tokenizer"))
    return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))


class TritonPythonModel:
    """The client-facing text-generation model."""

    def initialize(self, args):
        """Read the engine's model-info.json and tokenizer; note the KV-cache tensors' shapes."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = params["engine_dir"]
        with open(os.path.join(engine_dir, "model-info.json"), encoding="utf-8") as fh:
            info = json.load(fh)
        self.engine_model = params["engine_model"]
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.model_name = config["name"]
        self.tokenizer = load_tokenizer(engine_dir, info)
        self.eos = set(int(t) for t in info.get("eos_token_ids", []))
        self.pad = int(info.get("pad_token_id") or 0)
        self.max_seq = int(info["max_sequence_length"])
        kv = info["kv_cache"]
        self.past_names = list(kv["past_inputs"])
        self.present_names = list(kv["present_outputs"])
        by_name = {t["name"]: t for t in info["inputs"]}
        self.past_shapes = {}
        for name in self.past_names:
            dims = by_name[name]["dims"]  # [H, P, D] without batch
            dtype = NUMPY_DTYPES.get(by_name[name]["data_type"])
            if dtype is None:
                raise pb_utils.TritonModelException(
                    f"KV cache type {by_name[name]['data_type']} of {name} is not supported by the generation "
                    "model (numpy has no bfloat16): build the engine with precision fp16 or fp32"
                )
            self.past_shapes[name] = (int(dims[0]), int(dims[2]), dtype)
        self.engine_outputs = ["logits"] + self.present_names

    # ------------------------------------------------------------------ requests
    def _scalar(self, request, name, n, default, cast):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return [default] * n
        values = tensor.as_numpy().reshape(-1)
        if values.size == 1:
            return [cast(values[0])] * n
        if values.size != n:
            raise RequestError(f"{name} has {values.size} values for {n} prompts: send one, or one per prompt")
        return [cast(v) for v in values]

    def _parse(self, request, request_index):
        """The sequences of one request, or RequestError naming what is wrong."""
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        if text is None:
            raise RequestError("missing input 'text_input' (BYTES, shape [1, 1]): send the prompt as text_input")
        prompts = []
        for raw in text.as_numpy().reshape(-1):
            if isinstance(raw, bytes):
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError("text_input must be UTF-8 text") from None
            prompts.append(str(raw))
        if not prompts:
            raise RequestError("text_input holds no prompt")
        n = len(prompts)
        max_tokens = self._scalar(request, "max_tokens", n, self.default_max_tokens, int)
        temperature = self._scalar(request, "temperature", n, 0.0, float)
        top_p = self._scalar(request, "top_p", n, 1.0, float)
        top_k = self._scalar(request, "top_k", n, 0, int)
        seed = self._scalar(request, "seed", n, None, int)
        stream = self._scalar(request, "stream", n, False, bool)
        if any(stream) and not self.decoupled:
            raise RequestError(
                f"stream is true but model '{self.model_name}' answers in one response: for tokens as they are "
                f"made, call model '{self.model_name}_stream' over gRPC streaming"
            )
        if any(stream) and n != 1:
            raise RequestError("stream is true: send one prompt per request")
        sequences = []
        for row, prompt in enumerate(prompts):
            if prompt == "":
                raise RequestError("text_input is empty: send a non-empty prompt")
            if max_tokens[row] < 1:
                raise RequestError(f"max_tokens must be at least 1, got {max_tokens[row]}")
            if temperature[row] < 0 or not np.isfinite(temperature[row]):
                raise RequestError(f"temperature must be 0 (greedy) or positive, got {temperature[row]}")
            if not 0.0 < top_p[row] <= 1.0:
                raise RequestError(f"top_p must be in (0, 1], got {top_p[row]}")
            if top_k[row] < 0:
                raise RequestError(f"top_k must be 0 (off) or positive, got {top_k[row]}")
            ids = self.tokenizer.encode(prompt).ids
            if not ids:
                raise RequestError("text_input tokenizes to no tokens: send a non-empty prompt")
            if len(ids) >= self.max_seq:
                raise RequestError(
                    f"the prompt has {len(ids)} tokens; this model's maxSequenceLength is {self.max_seq}, "
                    "which must leave room for at least one new token: shorten the prompt"
                )
            room = self.max_seq - len(ids)
            sequences.append(
                Sequence(
                    request_index, row, ids, min(max_tokens[row], room), temperature[row], top_p[row], top_k[row],
                    seed[row], stream[row],
                )
            )
        return sequences

    # ------------------------------------------------------------------ engine
    def _run_engine(self, feeds):
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in feeds.items()]
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model, requested_output_names=self.engine_outputs, inputs=inputs, **kwargs
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"engine model {self.engine_model} failed: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.engine_outputs}

    def _pick(self, logits, seq):
        """Greedy when temperature is 0; otherwise temperature, top-k and top-p sampling."""
        if seq.temperature == 0.0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / seq.temperature
        if 0 < seq.top_k < x.size:
            kth = np.partition(x, -seq.top_k)[-seq.top_k]
            x = np.where(x < kth, -np.inf, x)
        if not np.isfinite(np.max(x)):
            return int(np.argmax(logits))  # inf/nan logits: no distribution to sample from
        x = x - np.max(x)
        probs = np.exp(x)
        probs /= probs.sum()
        if seq.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, seq.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(seq.rng.choice(probs.size, p=probs))

    def _generate(self, sequences, on_token):
        """Batched prefill and decode over ``sequences``; ``on_token(seq)`` after each new token."""
        batch = len(sequences)
        width = max(len(s.prompt_ids) for s in sequences)
        input_ids = np.full((batch, width), self.pad, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, s in enumerate(sequences):
            input_ids[i, width - len(s.prompt_ids):] = s.prompt_ids
            mask[i, width - len(s.prompt_ids):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = {
            name: np.zeros((batch, heads, 0, dim), dtype=dtype)
            for name, (heads, dim, dtype) in self.past_shapes.items()
        }
        active = list(sequences)
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, **past}
        while True:
            out = self._run_engine(feeds)
            logits = out["logits"]
            keep = []
            next_ids = []
            for i, s in enumerate(active):
                token = self._pick(logits[i], s)
                if token in self.eos:
                    s.done = True
                else:
                    s.generated.append(token)
                    if len(s.generated) >= s.max_new:
                        s.done = True
                on_token(s)
                if not s.done:
                    keep.append(i)
                    next_ids.append(token)
            if not keep:
                return
            rows = np.asarray(keep)
            active = [active[i] for i in keep]
            mask = np.concatenate([mask[rows], np.ones((len(keep), 1), dtype=np.int64)], axis=1)
            last_positions = feeds["position_ids"][rows, -1:]
            feeds = {
                "input_ids": np.asarray(next_ids, dtype=np.int64).reshape(-1, 1),
                "attention_mask": mask,
                "position_ids": last_positions + 1,
            }
            for past_name, present_name in zip(self.past_names, self.present_names):
                feeds[past_name] = out[present_name][rows]

    # ------------------------------------------------------------------ responses
    def _decode(self, seq):
        return self.tokenizer.decode(seq.generated, skip_special_tokens=True)

    def _text_response(self, texts):
        array = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", array)])

    @staticmethod
    def _error_response(message, invalid=True):
        """An error response; a bad request is INVALID_ARG (HTTP 400), anything else INTERNAL."""
        code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def execute(self, requests):
        """Answer every request of this batch: errors for bad ones, completions for the rest."""
        responses = [None] * len(requests)
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        sequences = []
        per_request = {}
        for index, request in enumerate(requests):
            try:
                seqs = self._parse(request, index)
            except RequestError as exc:
                responses[index] = self._error_response(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - any failure answers this request only
                responses[index] = self._error_response(f"bad request: {exc}")
                continue
            per_request[index] = seqs
            sequences.extend(seqs)

        def on_token(seq):
            if not (self.decoupled and seq.stream):
                return
            text = self._decode(seq)
            # Hold back text that ends inside a multi-byte character until the rest arrives.
            if seq.done or not text.endswith("\ufffd"):
                delta = text[len(seq.sent_text):]
                if delta and not seq.done:
                    senders[seq.request_index].send(self._text_response([delta]))
                    seq.sent_text = text

        if sequences:
            try:
                self._generate(sequences, on_token)
            except Exception as exc:  # noqa: BLE001 - an engine failure answers the whole batch
                for index in per_request:
                    responses[index] = self._error_response(f"generation failed: {exc}", invalid=False)
                per_request = {}
        for index, seqs in per_request.items():
            if self.decoupled and seqs[0].stream:
                text = self._decode(seqs[0])
                responses[index] = self._text_response([text[len(seqs[0].sent_text):]])
            else:
                responses[index] = self._text_response([self._decode(s) for s in seqs])
        if not self.decoupled:
            return responses
        for sender, response in zip(senders, responses):
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self):
        """Nothing to release: the engine model owns the session."""
