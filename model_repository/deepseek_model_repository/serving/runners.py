"""Runners: one text-generation step of an engine over a KV cache allocated once, where the engine runs.

A :class:`KvCache` holds ``slots x capacity`` positions per layer (numpy arrays on the CPU, torch
tensors on a GPU) and each slot's valid length.  A runner's :meth:`Runner.forward` advances the
contiguous slots ``[start, start + B)`` by the given new tokens: it hands the engine those cache
rows where they lie (a view, never a copy), gets back the logits and the new positions' keys and
values, and writes those few positions into the cache.  The logits stay where the engine left
them (:class:`StepLogits`): greedy rows take their argmax there, so a GPU step sends the host B
token ids rather than B x vocabulary floats.  The scheduler keeps its running
sequences in the first slots, so every step's rows are contiguous.

Runners:

* :class:`OrtRunner` — ONNX Runtime with I/O binding; the CPU provider binds the numpy cache in
  place, the CUDA provider binds device pointers into a torch-allocated cache;
* :class:`TensorRTRunner` — a TensorRT plan with device buffers (torch-allocated);
* :class:`TorchRunner` — the PyTorch reference over the transformers model, on any device torch has.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from deepseek_contract import engine_io

log = logging.getLogger(__name__)

NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64}


class RunnerError(RuntimeError):
    """A runner that cannot start or run; the message says what to install or change."""


def _cgroup_cpus(cgroup_root: Path) -> Optional[float]:
    """The CPU quota of this process's cgroup in CPUs (a pod's CPU limit), or None where there is none."""
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        fields = (cgroup_root / "cpu.max").read_text().split()
        return None if fields[0] == "max" else int(fields[0]) / int(fields[1])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        pass
    try:  # cgroup v1
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        return quota / int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text()) if quota > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, bool]:
    """The CPUs this process may use, and whether a CPU quota (not the affinity) is what sets them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None and math.ceil(quota) < cpus:
        return max(1, math.ceil(quota)), True
    return max(1, cpus), False


def engine_threads(requested: int = 0, cgroup_root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Threads of an engine on the CPU (``serving.engineThreads``): ``requested``; with 0, as many as the
    container's CPU limit where it has one below the CPUs it sees, else None (ONNX Runtime's own default, a thread
    per physical core of the node, which ignores a pod's CPU limit and would be throttled by it)."""
    if requested < 0:
        raise RunnerError(f"engine threads {requested} must be 0 (the container's CPUs) or more")
    if requested:
        return requested
    cpus, limited = available_cpus(cgroup_root)
    return cpus if limited else None


@dataclass(frozen=True)
class LayerShape:
    """One layer's cache: heads and head dim of its keys and of its values."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int


def layer_shapes(info: dict) -> list[LayerShape]:
    """The cache shapes a model-info.json's engine inputs declare."""
    by_name = {t["name"]: t for t in info["inputs"]}
    shapes = []
    for i in range(int(info["kv_cache"]["num_layers"])):
        key = by_name[f"past_key_values.{i}.key"]["dims"]
        value = by_name[f"past_key_values.{i}.value"]["dims"]
        shapes.append(LayerShape(int(key[0]), int(key[2]), int(value[0]), int(value[2])))
    return shapes


def cache_type(info: dict) -> str:
    return {t["name"]: t for t in info["inputs"]}["past_key_values.0.key"]["data_type"]


class KvCache:
    """``slots x capacity`` keys and values per layer, allocated once; ``lengths[slot]`` valid positions each."""

    def __init__(self, shapes: Sequence[LayerShape], slots: int, capacity: int, dtype: Any, device: str = "cpu",
                 *, torch_tensors: bool = False):
        self.shapes = list(shapes)
        self.slots = slots
        self.capacity = capacity
        self.device = device
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.layers: list[tuple[Any, Any]] = []
        if device == "cpu" and not torch_tensors:
            for s in self.shapes:
                self.layers.append((np.zeros((slots, s.key_heads, capacity, s.key_dim), dtype=dtype),
                                    np.zeros((slots, s.value_heads, capacity, s.value_dim), dtype=dtype)))
        else:
            import torch

            for s in self.shapes:
                self.layers.append((torch.zeros((slots, s.key_heads, capacity, s.key_dim), dtype=dtype, device=device),
                                    torch.zeros((slots, s.value_heads, capacity, s.value_dim), dtype=dtype,
                                                device=device)))
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        total = 0
        for key, value in self.layers:
            total += key.nbytes if isinstance(key, np.ndarray) else key.numel() * key.element_size()
            total += value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()
        return total

    def rows(self, start: int, stop: int) -> list[Any]:
        """The flat [key0, value0, key1, ...] views of slots ``[start, stop)`` (contiguous, no copy)."""
        return [t[start:stop] for layer in self.layers for t in layer]

    def write_index(self, start: int, counts: Sequence[int]) -> Any:
        """Where a step's new positions go: rows of ``new``, offsets in them, target slots and positions, [4, N].

        On a GPU the index crosses to the device in one copy. A runner takes it before the engine runs, while the
        device is idle: a copy from host memory waits for the device's queued work, so taken after the step was
        queued it would hold the host back until the step ends."""
        counts = np.asarray(counts, dtype=np.int64)
        rows = np.repeat(np.arange(counts.size), counts)  # the row of each new position
        offsets = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)  # its index among the row's
        positions = self.lengths[start:start + counts.size][rows] + offsets
        index = np.stack([rows, offsets, rows + start, positions])
        if self.layers and not isinstance(self.layers[0][0], np.ndarray):
            import torch

            return torch.from_numpy(index).to(self.layers[0][0].device)
        return index

    def write(self, start: int, counts: Sequence[int], new: Sequence[Any], index: Any = None) -> None:
        """Store each row's ``counts[r]`` new positions (``new`` flat like :meth:`rows`, [B, H, T, D]) in place.

        One indexed assignment per tensor, whatever the rows (on a GPU one kernel, not one per row).
        ``index`` is :meth:`write_index`'s for these ``start`` and ``counts``, where the caller took it earlier."""
        counts = np.asarray(counts, dtype=np.int64)
        rows, offsets, targets, positions = self.write_index(start, counts) if index is None else index
        for i, layer in enumerate(self.layers):
            for j, tensor in enumerate(layer):
                tensor[targets, :, positions] = new[2 * i + j][rows, :, offsets]
        self.lengths[start:start + counts.size] += counts

    def move(self, source: int, target: int) -> None:
        """Copy one slot's valid positions into another (the scheduler compacts finished slots away)."""
        if source == target:
            return
        n = int(self.lengths[source])
        for layer in self.layers:
            for tensor in layer:
                tensor[target, :, :n] = tensor[source, :, :n]
        self.lengths[target] = n
        self.lengths[source] = 0

    def copy_prefix(self, source: int, target: int, n: int) -> None:
        """Copy the first ``n`` positions of one slot into another, which then holds just those."""
        for layer in self.layers:
            for tensor in layer:
                tensor[target, :, :n] = tensor[source, :, :n]
        self.lengths[target] = n

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def scrub(self, slot: int) -> None:
        """Zero every position of one slot, not only its valid ones: after a sequence whose keys or values were
        not finite (an engine's overflow), whose stale positions a later sequence's masked attention would still
        multiply by zero, and NaN times zero is NaN."""
        for layer in self.layers:
            for tensor in layer:
                tensor[slot] = 0
        self.lengths[slot] = 0


#: The token :meth:`StepLogits.argmax` (and the scheduler's sampling) gives a row whose logits hold a NaN: there is
#: no token to choose.
NAN_ROW = -1


class StepLogits:
    """One step's logits [B, V] where the engine left them: a numpy array, or a torch tensor on the engine's device,
    valid until the runner's next step.

    :meth:`argmax` is every row's, taken there (on a GPU only B integers reach the host), :data:`NAN_ROW` for a row
    that holds a NaN; :meth:`row` copies one row to the host, for the rows that sample.
    """

    def __init__(self, data: Any):
        self.data = data
        self._argmax: Optional[np.ndarray] = None

    def argmax(self) -> np.ndarray:
        if self._argmax is None:
            # Both take a NaN for the largest value, so a row holds one where its chosen logit is NaN.
            if isinstance(self.data, np.ndarray):
                tokens = np.argmax(self.data, axis=-1)
                nan = np.isnan(self.data[np.arange(tokens.size), tokens])
                self._argmax = np.where(nan, NAN_ROW, tokens) if nan.any() else tokens
            else:
                import torch

                values, tokens = self.data.max(dim=-1)
                self._argmax = torch.where(torch.isnan(values), NAN_ROW, tokens).cpu().numpy()
        return self._argmax

    def row(self, r: int) -> np.ndarray:
        if isinstance(self.data, np.ndarray):
            return self.data[r]
        return self.data[r].float().cpu().numpy()

    def numpy(self) -> np.ndarray:
        """A host copy (a runner may write its next step's logits where these are)."""
        if isinstance(self.data, np.ndarray):
            return np.array(self.data, dtype=np.float32)
        return self.data.float().cpu().numpy()


#: Alignment of every tensor address a runner hands an engine: TensorRT's ``set_tensor_address`` asks for at least
#: 256 bytes (NvInferRuntime.h); torch's allocator aligns each allocation to 512.
DEVICE_ALIGNMENT = 256


def feeds_on_device(feeds: dict[str, np.ndarray], device: str) -> dict[str, Any]:
    """The step's int64 inputs as torch tensors on ``device``, in one copy from the host (a copy from host memory
    waits for the device's queued work, and one is enough); each starts ``DEVICE_ALIGNMENT``-aligned in it."""
    import torch

    names = list(feeds)
    step = DEVICE_ALIGNMENT // np.dtype(np.int64).itemsize
    starts, at = [], 0
    for n in names:
        starts.append(at)
        at += _round_up(int(feeds[n].size), step)
    flat = np.zeros(at, dtype=np.int64)
    for n, start in zip(names, starts):
        flat[start:start + feeds[n].size] = np.asarray(feeds[n], dtype=np.int64).ravel()
    on_device = torch.from_numpy(flat).to(device)
    return {n: on_device[start:start + feeds[n].size].view(feeds[n].shape) for n, start in zip(names, starts)}


class Runner:
    """One engine and its cache.  Subclasses implement :meth:`_run`."""

    cache: KvCache
    vocab_size: int

    def step(self, start: int, input_ids: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
        """:meth:`forward`, with the logits on the host: float32 [B, V]."""
        return self.forward(start, input_ids, token_mask).numpy()

    def forward(self, start: int, input_ids: np.ndarray, token_mask: np.ndarray) -> StepLogits:
        """Advance slots ``[start, start + B)`` by the tokens of ``input_ids`` [B, T] (right-padded,
        ``token_mask`` 1 on real tokens); returns the logits [B, V] at each row's last real token, where the engine
        left them."""
        batch, width = input_ids.shape
        stop = start + batch
        lengths = self.cache.lengths[start:stop].copy()
        counts = token_mask.sum(axis=1).astype(np.int64)
        if int((lengths + counts).max()) > self.cache.capacity:
            raise RunnerError(f"a sequence would exceed the cache's capacity of {self.cache.capacity} positions")
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "position_ids": lengths[:, None] + np.arange(width, dtype=np.int64)[None, :],
            "token_mask": np.ascontiguousarray(token_mask, dtype=np.int64),
            "cache_lengths": lengths,
        }
        index = self.cache.write_index(start, counts)
        logits, new = self._run(feeds, start, stop)
        self.cache.write(start, counts, new, index)
        return StepLogits(logits)

    def _run(self, feeds: dict[str, np.ndarray], start: int, stop: int) -> tuple[Any, list[Any]]:
        """The engine's logits (numpy, or torch on its device) and new keys and values of slots ``[start, stop)``."""
        raise NotImplementedError


# ---------------------------------------------------------------- ONNX Runtime
class OrtRunner(Runner):
    """An ONNX engine under ONNX Runtime with I/O binding: the cache rows are bound where they lie."""

    def __init__(self, model_file: Path, info: dict, slots: int, capacity: int, *, provider: str = "cpu",
                 threads: int = 0, device_id: int = 0):
        import onnxruntime as ort

        self.ort = ort
        self.info = info
        self.num_layers = int(info["kv_cache"]["num_layers"])
        self.vocab_size = int(info.get("vocab_size") or 0)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = engine_threads(threads) if provider != "cuda" else None
        if threads:
            options.intra_op_num_threads = threads
        kv_type = NUMPY_TYPES.get(cache_type(info))
        if kv_type is None:
            raise RunnerError(f"KV cache type {cache_type(info)} is not supported by ONNX Runtime here: build the "
                              "engine with precision fp16 or fp32")
        self.kv_type = kv_type
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RunnerError("ONNX Runtime has no CUDA provider here: install onnxruntime-gpu, or serve on CPU")
            providers = [("CUDAExecutionProvider", {"device_id": device_id})]
            import torch

            self.torch = torch
            self.device = f"cuda:{device_id}"
            self.cache = KvCache(layer_shapes(info), slots, capacity, _torch_dtype(kv_type), self.device)
        else:
            providers = ["CPUExecutionProvider"]
            self.device = "cpu"
            self.cache = KvCache(layer_shapes(info), slots, capacity, kv_type, "cpu")
            if kv_type == np.float16:
                log.warning("an fp16 engine on the CPU: ONNX Runtime has no fp16 attention kernels there and converts "
                            "the bound KV cache (every slot's whole capacity) to fp32 in every step; build the engine "
                            "with engine.precision fp32 to serve on the CPU")
        self.device_id = device_id
        self.session = ort.InferenceSession(str(model_file), options, providers=providers)
        if not self.vocab_size:
            self.vocab_size = int({o.name: o.shape for o in self.session.get_outputs()}[engine_io.LOGITS][-1])
        #: CPU: the logits of every slot, allocated once; each step's engine writes its rows there.
        self._logits = np.empty((slots, self.vocab_size), dtype=np.float32) if self.device == "cpu" else None

    def _run(self, feeds, start, stop):
        binding = self.session.io_binding()
        past = engine_io.past_names(self.num_layers)
        rows = self.cache.rows(start, stop)
        if self.device == "cpu":
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name, view in zip(past, rows):
                binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(view))
            # Every output into an array of ours, bound where it lies: the logits into rows of the buffer allocated
            # once, each layer's new positions into a small array of this step's shape. Nothing is copied out.
            batch, width = feeds["input_ids"].shape
            logits = self._logits[:batch]
            new = [np.empty((batch, view.shape[1], width, view.shape[3]), dtype=view.dtype) for view in rows]
            for name, array in zip((engine_io.LOGITS, *engine_io.present_names(self.num_layers)), (logits, *new)):
                binding.bind_ortvalue_output(name, self.ort.OrtValue.ortvalue_from_numpy(array))
            self.session.run_with_iobinding(binding)
            return logits, new
        torch = self.torch
        keep = feeds_on_device(feeds, self.device)
        for name, tensor in keep.items():
            self._bind(binding.bind_input, name, tensor)
        for name, view in zip(past, rows):
            self._bind(binding.bind_input, name, view)
        batch, width = feeds["input_ids"].shape
        logits = torch.empty((batch, self.vocab_size), dtype=torch.float32, device=self.device)
        self._bind(binding.bind_output, engine_io.LOGITS, logits)
        new = []
        for name, view in zip(engine_io.present_names(self.num_layers), rows):
            out = torch.empty((batch, view.shape[1], width, view.shape[3]), dtype=view.dtype, device=self.device)
            self._bind(binding.bind_output, name, out)
            new.append(out)
        self.session.run_with_iobinding(binding)
        return logits, new

    def _bind(self, bind, name, tensor) -> None:
        dtype = {self.torch.float32: np.float32, self.torch.float16: np.float16,
                 self.torch.int64: np.int64}[tensor.dtype]
        bind(name, "cuda", self.device_id, dtype, list(tensor.shape), tensor.data_ptr())


# ---------------------------------------------------------------- TensorRT
class TensorRTRunner(Runner):
    """A TensorRT plan: device buffers from torch, cache rows bound by address, new positions written on the GPU.

    The execution context's activation memory is ours (``USER_MANAGED``), sized for each step's shapes: the plan's
    profile reaches a prefill of the whole context in every slot, which the scheduler never sends, and TensorRT's
    default (``STATIC``) would reserve that much at load.
    """

    def __init__(self, plan_file: Path, info: dict, slots: int, capacity: int, *, device_id: int = 0):
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise RunnerError(f"the TensorRT runner needs tensorrt and torch with CUDA ({exc})") from None
        if not torch.cuda.is_available():
            raise RunnerError("the TensorRT runner needs an NVIDIA GPU visible to this process")
        self.torch = torch
        self.device = f"cuda:{device_id}"
        self.info = info
        self.num_layers = int(info["kv_cache"]["num_layers"])
        self.vocab_size = int(info.get("vocab_size") or 0)
        _check_plan_gpu(info.get("gpu"), torch.cuda.get_device_name(device_id),
                        torch.cuda.get_device_capability(device_id))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_file).read_bytes())
        if self.engine is None:
            raise RunnerError(f"{plan_file}: TensorRT could not load this plan (built by another TensorRT or GPU?)")
        _check_plan_tensors(self.engine, trt, self.num_layers)
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise RunnerError(f"{plan_file}: TensorRT could not create an execution context (out of GPU memory?)")
        #: The activation memory handed to the context: grown to the largest step so far, never shrunk.
        self._scratch = torch.empty(0, dtype=torch.uint8, device=self.device)
        kv_type = {"TYPE_FP16": torch.float16, "TYPE_BF16": torch.bfloat16, "TYPE_FP32": torch.float32}[cache_type(info)]
        self.cache = KvCache(layer_shapes(info), slots, capacity, kv_type, self.device)
        _check_row_alignment(self.cache)
        self.stream = torch.cuda.Stream(device=self.device)

    def _run(self, feeds, start, stop):
        torch = self.torch
        # The engine's stream waits for what the default stream queued: the last step's cache writes and reads.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            keep = feeds_on_device(feeds, self.device)  # held until the engine has run
            for name, tensor in keep.items():
                self._bind_input(name, tensor)
            rows = self.cache.rows(start, stop)
            for name, view in zip(engine_io.past_names(self.num_layers), rows):
                self._bind_input(name, view)
            self._bind_scratch()
            batch, width = feeds["input_ids"].shape
            logits = torch.empty((batch, self.vocab_size), dtype=torch.float32, device=self.device)
            self._bind_output(engine_io.LOGITS, logits)
            new = []
            for name, view in zip(engine_io.present_names(self.num_layers), rows):
                out = torch.empty((batch, view.shape[1], width, view.shape[3]), dtype=view.dtype, device=self.device)
                self._bind_output(name, out)
                new.append(out)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RunnerError("TensorRT execution failed")
        self.stream.synchronize()
        return logits, new

    def _bind_input(self, name, tensor) -> None:
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            raise RunnerError(f"TensorRT refused the shape {tuple(tensor.shape)} of input {name}: outside the plan's "
                              "optimisation profile (rebuild the engine with this maxBatchSize and maxSequenceLength)")
        self._bind(name, tensor)

    def _bind_output(self, name, tensor) -> None:
        shape = tuple(self.context.get_tensor_shape(name))
        if shape != tuple(tensor.shape):
            raise RunnerError(f"the plan's output {name} has shape {shape} for this step, not {tuple(tensor.shape)}: "
                              "the plan does not match its model-info.json; rebuild the engine")
        self._bind(name, tensor)

    def _bind(self, name, tensor) -> None:
        if tensor.data_ptr() % DEVICE_ALIGNMENT or not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise RunnerError(f"TensorRT refused the address of {name} (it must be {DEVICE_ALIGNMENT}-byte aligned)")

    def _bind_scratch(self) -> None:
        """Activation memory for this step's shapes (every input's set): what TensorRT asks for, allocated anew only
        when a step needs more than any before. A plan built with RUNTIME_ACTIVATION_RESIZE asks for what these
        shapes need; another for its profile's maximum."""
        size = int(self.context.update_device_memory_size_for_shapes())
        if size > self._scratch.numel():
            self._scratch = self.torch.empty(size, dtype=self.torch.uint8, device=self.device)
        if size:
            self.context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())


def _check_plan_gpu(built_on: Optional[dict], name: str, capability: tuple[int, int]) -> None:
    """Refuse a plan built for another GPU architecture, saying how to pin the model to one GPU product."""
    if not built_on or "compute_capability" not in built_on:
        return
    here = f"{capability[0]}.{capability[1]}"
    if str(built_on["compute_capability"]) != here:
        raise RunnerError(f"this TensorRT plan was built on {built_on.get('name', 'a GPU')} (compute capability "
                          f"{built_on['compute_capability']}) and this GPU is {name} ({here}): a plan runs only on the "
                          "GPU architecture it was built on. Pin the model's build Job and Triton pods to one GPU "
                          "product with serving.nodeSelector nvidia.com/gpu.product (the engine's key then names it)")


def _check_plan_tensors(engine, trt, num_layers: int) -> None:
    """The plan's inputs and outputs must be the step contract's (engine format 2), by name and direction."""
    want = {**{n: trt.TensorIOMode.INPUT for n in (*engine_io.STEP_INPUTS, *engine_io.past_names(num_layers))},
            **{n: trt.TensorIOMode.OUTPUT for n in (engine_io.LOGITS, *engine_io.present_names(num_layers))}}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    got = {n: engine.get_tensor_mode(n) for n in names}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise RunnerError(f"this TensorRT plan's tensors are not the text-generation step's (missing {missing}, "
                          f"unexpected {extra}): rebuild the engine")


def _check_row_alignment(cache: KvCache) -> None:
    """Every slot's rows start where TensorRT takes an address: a slot's size in bytes is a multiple of 256."""
    for key, value in cache.layers:
        for tensor in (key, value):
            row = tensor[0].numel() * tensor.element_size()
            if row % DEVICE_ALIGNMENT:
                raise RunnerError(f"a KV-cache slot of {tuple(tensor.shape[1:])} takes {row} bytes, not a multiple "
                                  f"of {DEVICE_ALIGNMENT}, so its rows cannot be bound in place: use a "
                                  "maxSequenceLength that is a multiple of 128")


# ---------------------------------------------------------------- PyTorch
class TorchRunner(Runner):
    """The transformers model itself, through the same step as the engines, on any torch device.

    Its cache rows are passed as views trimmed to the longest valid length in the batch, so a
    step's attention costs what its context costs.
    """

    def __init__(self, model, slots: int, capacity: int, *, device: Optional[str] = None):
        import torch

        from .torch_step import TextGenerationStep, cache_shapes

        self.torch = torch
        self.model = model.eval()
        self.device = device or str(next(model.parameters()).device)
        if device:
            self.model.to(device)
        shapes = [LayerShape(k[0], k[1], v[0], v[1]) for k, v in cache_shapes(self.model)]
        self.num_layers = len(shapes)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        dtype = self.model.get_input_embeddings().weight.dtype
        self.cache = KvCache(shapes, slots, capacity, dtype, self.device, torch_tensors=True)
        self.step_module = TextGenerationStep(self.model, self.num_layers)

    def _run(self, feeds, start, stop):
        torch = self.torch
        from .torch_step import split_cache_attention_of

        window = int(min(self.cache.capacity, _round_up(int(feeds["cache_lengths"].max()) + 1, 64)))
        views = [view[:, :, :window] for view in self.cache.rows(start, stop)]
        on_device = feeds_on_device(feeds, self.device)
        tensors = [on_device[n] for n in engine_io.STEP_INPUTS]
        with torch.no_grad(), split_cache_attention_of(self.model):
            outputs = self.step_module(*tensors, *views)
        return outputs[0], list(outputs[1:])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _torch_dtype(np_dtype):
    import torch

    return {np.float32: torch.float32, np.float16: torch.float16}[np_dtype]


def open_runner(engine_dir: Path, info: dict, slots: int, capacity: int, *, device: str = "cpu",
                threads: int = 0) -> Runner:
    """The runner for an engine directory: ONNX Runtime (CPU or CUDA) or TensorRT, by the engine's backend."""
    engine_file = Path(engine_dir) / info["engine_file"]
    if info["backend"] == "tensorrt":
        return TensorRTRunner(engine_file, info, slots, capacity, device_id=_device_id(device))
    provider = "cuda" if device.startswith("cuda") else "cpu"
    return OrtRunner(engine_file, info, slots, capacity, provider=provider, threads=threads,
                     device_id=_device_id(device))


def _device_id(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
