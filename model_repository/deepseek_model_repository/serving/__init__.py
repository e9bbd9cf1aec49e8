"""Text generation served by a scheduler that batches in flight over a KV cache kept where the engine runs.

* :mod:`.torch_step` — the PyTorch step module (the ONNX export traces it; the PyTorch runner runs it);
* :mod:`.runners` — one runner per runtime (ONNX Runtime, TensorRT, PyTorch) over a :class:`KvCache`;
* :mod:`.scheduler` — admission into free slots between decode steps, sampling, metrics.

The engine's step contract (tensor names) is ``deepseek_contract.engine_io``.  Nothing here imports Triton: the Python model under ``models/generate`` wires the scheduler to it.
"""
