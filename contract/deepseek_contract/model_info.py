"""``model-info.json``: what the builder records about an engine and the serving models read.

The builder writes it with :meth:`ModelInfo.dump`; the repository writer and the serving
models load it with :meth:`ModelInfo.load`, so a file of another format or a missing field
is refused with its name, never misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .layout import MODEL_INFO
from .vocabulary import Architecture, Backend, Precision, Task

#: The model-info.json format this contract reads and writes.
MODEL_INFO_FORMAT = 2

TritonType = str  # TYPE_FP32, TYPE_INT64, ... (Triton's DataType names)


class ModelInfoError(ValueError):
    """A model-info.json that cannot be used; the message names the file and the field."""


class TensorInfo(BaseModel):
    """One engine tensor: Triton data type and dims without the batch dimension."""

    model_config = ConfigDict(extra="forbid")
    name: str
    data_type: TritonType
    dims: list[int]


class KvCacheInfo(BaseModel):
    """The engine's KV cache (text generation only)."""

    model_config = ConfigDict(extra="allow")
    num_layers: int = Field(ge=1)
    past_inputs: list[str]
    present_outputs: list[str]


class ModelInfo(BaseModel):
    """The schema of ``model-info.json``."""

    model_config = ConfigDict(extra="allow")

    format: int
    task: Task
    backend: Backend
    precision: Precision
    architecture: Architecture
    engine_file: str
    max_batch_size: int = Field(ge=1)
    max_sequence_length: int = Field(ge=2)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tokenizer_dir: str = "tokenizer"
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = Field(default_factory=list)
    pad_token_id: Optional[int] = None
    hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    kv_cache: Optional[KvCacheInfo] = None
    labels: Optional[list[str]] = None

    @model_validator(mode="after")
    def _task_fields(self) -> "ModelInfo":
        if self.format != MODEL_INFO_FORMAT:
            raise ValueError(f"format {self.format} is not supported (expected {MODEL_INFO_FORMAT}): rebuild the engine")
        if self.task == "text-generation" and self.kv_cache is None:
            raise ValueError("kv_cache is missing (required for text-generation)")
        if self.task == "text-classification" and not self.labels:
            raise ValueError("labels is missing (required for text-classification)")
        return self

    @classmethod
    def load(cls, engine_dir: Union[str, Path]) -> "ModelInfo":
        """Read and check ``<engine_dir>/model-info.json``."""
        path = Path(engine_dir) / MODEL_INFO
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelInfoError(f"{path}: no such file; is {engine_dir} a finished engine directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelInfoError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                problems.append(f"{where}: {err['msg']}" if where else err["msg"].removeprefix("Value error, "))
            raise ModelInfoError(f"{path}: " + "; ".join(problems)) from None

    def dump(self, engine_dir: Union[str, Path]) -> Path:
        path = Path(engine_dir) / MODEL_INFO
        path.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
        return path
