"""Text classification and feature extraction: text in, label and probabilities or an embedding out.

All prompts of a dynamic batch are left-padded into one engine call (BLS to the
engine model); the attention mask hides the padding, so each result is the one
the prompt would get alone.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from deepseek_model_repository.serving.processes import announce_initialized
from deepseek_model_repository.serving.triton import FAILED, error_response


class RequestError(Exception):
    """A bad request: answered with this message, the rest of the batch goes on."""


class TritonPythonModel:
    """The client-facing model for text-classification and feature-extraction engines."""

    def initialize(self, args):
        """Read model-info.json and the tokenizer from the engine directory."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = params["engine_dir"]
        with open(os.path.join(engine_dir, "model-info.json"), encoding="utf-8") as fh:
            info = json.load(fh)
        self.task = info["task"]
        self.labels = list(info.get("labels") or [])
        self.engine_model = params["engine_model"]
        tok_dir = os.path.join(engine_dir, info.get("tokenizer_dir", "tokenizer"))
        self.tokenizer = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        self.pad = int(info.get("pad_token_id") or 0)
        self.max_seq = int(info["max_sequence_length"])
        self.engine_output = "logits" if self.task == "text-classification" else "embedding"
        announce_initialized(args)

    def _parse(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        if text is None:
            raise RequestError("missing input 'text_input' (BYTES, shape [1, 1]): send the text as text_input")
        rows = []
        for raw in text.as_numpy().reshape(-1):
            if isinstance(raw, bytes):
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError("text_input must be UTF-8 text") from None
            if str(raw) == "":
                raise RequestError("text_input is empty: send non-empty text")
            ids = self.tokenizer.encode(str(raw)).ids
            if not ids:
                raise RequestError("text_input tokenizes to no tokens: send non-empty text")
            if len(ids) > self.max_seq:
                raise RequestError(
                    f"the text has {len(ids)} tokens; this model's maxSequenceLength is {self.max_seq}: shorten it"
                )
            rows.append(ids)
        if not rows:
            raise RequestError("text_input holds no text")
        return rows

    def _run_engine(self, rows):
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids):] = ids
            mask[i, width - len(ids):] = 1
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            requested_output_names=[self.engine_output],
            inputs=[pb_utils.Tensor("input_ids", input_ids), pb_utils.Tensor("attention_mask", mask)],
            **kwargs,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"engine model {self.engine_model} failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, self.engine_output).as_numpy()

    def _response(self, values):
        if self.task == "feature-extraction":
            return pb_utils.InferenceResponse([pb_utils.Tensor("embedding", values.astype(np.float32))])
        shifted = values.astype(np.float64) - values.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        labels = np.array([[self.labels[int(i)].encode("utf-8")] for i in probs.argmax(axis=1)], dtype=np.object_)
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor("label", labels), pb_utils.Tensor("probabilities", probs.astype(np.float32))]
        )

    def execute(self, requests):
        """One engine call for all valid requests of the batch; errors for the others."""
        responses = [None] * len(requests)
        parsed = {}
        for index, request in enumerate(requests):
            try:
                parsed[index] = self._parse(request)
            except Exception as exc:  # noqa: BLE001 - answers this request only
                responses[index] = error_response(str(exc))
        if parsed:
            rows = [ids for index in parsed for ids in parsed[index]]
            try:
                values = self._run_engine(rows)
                start = 0
                for index, ids_list in parsed.items():
                    responses[index] = self._response(values[start:start + len(ids_list)])
                    start += len(ids_list)
            except Exception as exc:  # noqa: BLE001
                for index in parsed:
                    responses[index] = error_response(f"inference failed: {exc}", FAILED)
        return responses

    def finalize(self):
        """Nothing to release."""
