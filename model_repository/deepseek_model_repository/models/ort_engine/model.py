"""The engine under the local mode: an ONNX engine run by onnxruntime inside a Python-backend model.

PyTriton's Triton has only the Python backend; in a cluster the same engine runs
under Triton's native onnxruntime backend and this model is not used.  Requests
whose tensors agree in every dimension but the batch are concatenated into one
session run, as the native backend's dynamic batching would.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from deepseek_model_repository.serving.processes import announce_initialized


class TritonPythonModel:
    """One onnxruntime.InferenceSession over the engine's model.onnx."""

    def initialize(self, args):
        """Open the ONNX engine named by the engine_dir and engine_file parameters."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(params["engine_dir"], params["engine_file"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        announce_initialized(args)

    def _feeds(self, request):
        feeds = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing engine input {name!r}")
            feeds[name] = tensor.as_numpy()
        return feeds

    def execute(self, requests):
        """Run compatible requests together, each group in one session call."""
        responses = [None] * len(requests)
        groups = {}
        feeds = {}
        for index, request in enumerate(requests):
            try:
                feeds[index] = self._feeds(request)
            except Exception as exc:  # noqa: BLE001
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
                continue
            signature = tuple((n, feeds[index][n].shape[1:], feeds[index][n].dtype.str) for n in self.input_names)
            groups.setdefault(signature, []).append(index)
        for members in groups.values():
            try:
                sizes = [feeds[i][self.input_names[0]].shape[0] for i in members]
                batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.input_names}
                outputs = self.session.run(self.output_names, batch)
                offsets = np.cumsum([0] + sizes)
                for k, index in enumerate(members):
                    tensors = [
                        pb_utils.Tensor(name, np.ascontiguousarray(out[offsets[k]:offsets[k + 1]]))
                        for name, out in zip(self.output_names, outputs)
                    ]
                    responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:  # noqa: BLE001 - a failed run answers its group, the server goes on
                for index in members:
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"onnxruntime failed: {exc}")
                    )
        return responses

    def finalize(self):
        """Drop the session."""
        self.session = None
