"""The DeepSeekModel API (deepseek.ai/v1alpha1): the single source of truth.

The pydantic models below validate every code path (operator, renderer, builder,
local mode) and generate the CRD's OpenAPI schema (see ``crd.py``).  Cross-field
rules are written twice on purpose: once as a pydantic validator (so they hold in
Python) and once as the CEL expression attached to the same model (so they hold
at ``kubectl apply``); ``tests/unit/test_api.py`` checks the pairs agree.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from deepseek_contract import vocabulary
from deepseek_contract.versions import TRITON_IMAGE
from deepseek_contract.vocabulary import BACKEND_PRECISIONS, Backend, Precision, Task
from deepseek_model_repository.repository import (DEFAULT_PREFILL_TOKENS, DEFAULT_QUEUE_DELAY_US, DEFAULT_STREAM_INTERVAL,
                                                  default_queue_delay_us)

GROUP = "deepseek.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DeepSeekModel"
PLURAL = "deepseekmodels"
SINGULAR = "deepseekmodel"
SHORT_NAMES = ["dsm"]

#: The Triton image the operator deploys by default (its TensorRT backend pins the builder's TensorRT).
DEFAULT_TRITON_IMAGE = TRITON_IMAGE
SOURCE_SCHEMES = tuple(f"{scheme}://" for scheme in vocabulary.SOURCE_SCHEMES)
SOURCE_PATTERN = r"^(hf://[^/\s]+/[^/\s]+|s3://[^/\s]+(/\S*)?|pvc://[^/\s]+/\S*|file:///\S*)$"
ORT_PRECISIONS = BACKEND_PRECISIONS["onnxruntime"]
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
#: A URL whose authority holds user info (``s3://KEY:SECRET@bucket``, ``hf://user:token@org/name``).
CREDENTIALS_PATTERN = r"^[A-Za-z0-9+.-]+://[^/]*@"
CREDENTIALS_MESSAGE = (
    "must not embed credentials (user:password@ in the URL): put them in a Secret and name it in "
    "spec.model.credentialsSecret (keys HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
)



class SpecError(ValueError):
    """A DeepSeekModel that fails validation; ``str()`` names each offending field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid DeepSeekModel: " + "; ".join(problems))


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class _Model(BaseModel):
    """Base: camelCase on the wire, unknown fields refused (as kubectl's strict validation does)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it appears in the Kubernetes API (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- spec.model
def _no_credentials_rule(prefix: str) -> dict[str, str]:
    return cel(f"!self.source.matches('{CREDENTIALS_PATTERN}')", f"{prefix}.source {CREDENTIALS_MESSAGE}", ".source")


class AdapterSpec(_Model):
    """A LoRA adapter merged into the base weights before the engine is built."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_no_credentials_rule("model.adapter")]})

    source: str = Field(
        description="Where the adapter lives: hf://org/name, s3://bucket/prefix, pvc://claim/path or file:///abs/path. "
        "It must be a PEFT LoRA adapter trained on the base model's architecture. No credentials in the URL.",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )
    revision: Optional[str] = Field(
        default=None, description="Branch, tag or commit of an hf:// adapter. Pin a commit for reproducible engines."
    )

    @field_validator("source")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return _check_source(v)


class ModelSpec(_Model):
    """Which checkpoint to serve and for what task."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_no_credentials_rule("model")]})

    source: str = Field(
        description="Where the checkpoint lives: hf://org/name (Hugging Face Hub), s3://bucket/prefix (S3 or an "
        "S3-compatible store), pvc://claim/path (a PersistentVolumeClaim in this namespace) or file:///abs/path "
        "(a path on the builder's filesystem). No credentials in the URL: use credentialsSecret.",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )
    revision: Optional[str] = Field(
        default=None,
        description="Branch, tag or commit of an hf:// source. Pin a commit: the engine cache is keyed on it, so an "
        "unpinned revision reuses whatever engine was built first.",
    )
    task: Task = Field(
        default="text-generation",
        description="text-generation (text in, completion out), text-classification (label and probabilities) or "
        "feature-extraction (a mean-pooled embedding).",
    )
    adapter: Optional[AdapterSpec] = Field(default=None, description="A LoRA adapter merged before the build.")
    credentials_secret: Optional[str] = Field(
        default=None,
        description="Name of a Secret in this namespace whose keys become the builder's environment, e.g. HF_TOKEN, "
        "HF_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL.",
    )

    @field_validator("source")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return _check_source(v)


def _check_source(v: str) -> str:
    if re.match(CREDENTIALS_PATTERN, v):
        raise ValueError(CREDENTIALS_MESSAGE)  # and the value is not echoed: it holds a secret
    if not re.match(SOURCE_PATTERN, v):
        raise ValueError(
            f"{v!r} is not a supported source: use hf://org/name, s3://bucket/prefix, pvc://claim/path or file:///abs/path"
        )
    return v


# ---------------------------------------------------------------- resources
#: Requests and limits of each container the operator renders, per key: a key the CR sets wins, the others stay.
#: (GPUs come from serving.gpusPerReplica and the backend, not from here.)
TRITON_RESOURCES = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}}
REPOSITORY_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
BUILDER_RESOURCES = {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "64Gi"}}


def _defaults_text(defaults: dict[str, dict[str, str]]) -> str:
    parts = [f"{kind} " + ", ".join(f"{k} {v}" for k, v in values.items()) for kind, values in defaults.items()]
    return "Keys left unset take the defaults: " + "; ".join(parts) + "."


class ResourceRequirements(_Model):
    """CPU, memory and ephemeral-storage requests and limits of a container (GPUs are set elsewhere)."""

    limits: dict[str, str] = Field(
        default_factory=dict, description="Resource limits, e.g. {cpu: '8', memory: 64Gi}.",
        json_schema_extra={"additionalProperties": {"type": "string", "pattern": QUANTITY_PATTERN}},
    )
    requests: dict[str, str] = Field(
        default_factory=dict, description="Resource requests, e.g. {cpu: '4', memory: 32Gi}.",
        json_schema_extra={"additionalProperties": {"type": "string", "pattern": QUANTITY_PATTERN}},
    )

    @field_validator("limits", "requests", mode="before")
    @classmethod
    def _quantities(cls, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for name, q in v.items():
                q = str(q)
                if not re.match(QUANTITY_PATTERN, q):
                    raise ValueError(f"{name}: {q!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
                out[name] = q
            return out
        return v


# ---------------------------------------------------------------- spec.engine
class EngineSpec(_Model):
    """How the engine is built. Any change here builds a new engine (the old one serves meanwhile)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.backend != 'onnxruntime' || self.precision in ['fp32', 'fp16', 'int8']",
                    "engine.precision must be fp32, fp16 or int8 when engine.backend is onnxruntime",
                    ".precision",
                )
            ]
        }
    )

    backend: Backend = Field(
        default="tensorrt",
        description="tensorrt (an NVIDIA GPU engine served by Triton's TensorRT backend) or onnxruntime (served by "
        "Triton's ONNX Runtime backend, on CPU or GPU).",
    )
    precision: Precision = Field(
        default="fp16",
        description="Numeric precision of the engine: fp32, fp16, bf16, int8 or fp8. onnxruntime takes fp32, fp16 or int8.",
    )
    max_batch_size: int = Field(
        default=8, ge=1, le=1024, description="Largest batch the engine accepts (Triton's max_batch_size). For "
        "text generation, the KV cache's slots: how many sequences decode together in flight."
    )
    max_sequence_length: int = Field(
        default=2048, ge=16, le=1048576, description="Longest prompt plus completion, in tokens, the engine accepts."
    )
    builder_resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="Requests and limits of the build Job's container (a tensorrt build also gets one GPU). "
        "Not part of the engine key: a change applies to build Jobs started after it. "
        + _defaults_text(BUILDER_RESOURCES),
    )

    @model_validator(mode="after")
    def _ort_precisions(self) -> "EngineSpec":
        if self.backend == "onnxruntime" and self.precision not in ORT_PRECISIONS:
            raise ValueError(
                f"precision {self.precision!r} is not available with backend onnxruntime: use fp32, fp16 or int8"
            )
        return self


# ---------------------------------------------------------------- spec.serving
class DynamicBatchingSpec(_Model):
    """Triton's dynamic batcher: requests that arrive together share one forward pass.

    Classification and embedding models are batched by it.  Text generation is batched in flight by the
    model's own scheduler (up to engine.maxBatchSize sequences decode together, joining and leaving between
    steps), so there only the queue delay applies.
    """

    max_queue_delay_microseconds: Optional[int] = Field(
        default=None,
        ge=0,
        le=10_000_000,
        description="How long a request may wait for others to form a larger batch, in microseconds (default "
        f"{DEFAULT_QUEUE_DELAY_US}). For text generation, how long Triton holds a request before handing it to the "
        f"in-flight scheduler, streamed or plain (default {default_queue_delay_us('text-generation')}: at once, "
        "since the scheduler batches by itself and a delay only adds to the time to the first token).",
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"items": {"type": "integer", "minimum": 1}},
        description="Batch sizes the batcher tries to form, each between 1 and engine.maxBatchSize. Not used "
        "for text generation: its scheduler admits requests into free slots between decode steps.",
    )

    def queue_delay_us(self, task: str) -> int:
        """The queue delay for a model of ``task``: the one set, else that task's default."""
        if self.max_queue_delay_microseconds is not None:
            return self.max_queue_delay_microseconds
        return default_queue_delay_us(task)

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if s < 1]
        if bad:
            raise ValueError(f"batch sizes must be at least 1, got {bad}")
        return v


class Toleration(_Model):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: Optional[str] = Field(default=None, description="Taint key the toleration applies to.")
    operator: Optional[Literal["Exists", "Equal"]] = Field(default=None, description="Exists or Equal.")
    value: Optional[str] = Field(default=None, description="Taint value to match with operator Equal.")
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: Optional[int] = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction."
    )


#: One message for the rule, from the CRD's CEL and from the operator alike.
ENGINE_THREADS_ON_GPU = (
    "serving.engineThreads sets the CPU threads of an engine served on the CPU: set it only with "
    "serving.gpusPerReplica 0, or remove it"
)


#: A stopping Triton pod waits this long (a preStop hook) before Triton is told to stop, so that the Service's
#: endpoints drop it first and no new request reaches a server that refuses it; then Triton drains for
#: ``serving.drainSeconds``, and the pod's grace period allows for both and this much more for Triton's exit.
PRESTOP_SECONDS = 5
EXIT_MARGIN_SECONDS = 5


class ServingSpec(_Model):
    """How Triton is deployed. Changes here roll the Deployment and never rebuild the engine."""

    replicas: int = Field(default=1, ge=0, description="Triton replicas; ignored while autoscaling is enabled.")
    gpus_per_replica: int = Field(
        default=1, ge=0, le=16, description="GPUs for each Triton pod (nvidia.com/gpu); 0 deploys on CPU."
    )
    image: str = Field(default=DEFAULT_TRITON_IMAGE, min_length=1, description="The Triton Inference Server image.")
    dynamic_batching: DynamicBatchingSpec = Field(
        default_factory=DynamicBatchingSpec, description="Triton's dynamic batcher for this model."
    )
    stream_interval: int = Field(
        default=DEFAULT_STREAM_INTERVAL,
        ge=1,
        le=256,
        description="Text generation: tokens per streamed response. 1 sends each token's text as it is made; N sends "
        "the first token at once and then N tokens per response, which cuts the per-response work of Triton and "
        "of clients (more tokens/s under load, burstier streams). Plain requests are answered in one response "
        "either way.",
    )
    request_timeout_seconds: float = Field(
        default=0,
        ge=0,
        le=86400,
        description="Text generation: the longest a request may take, queued and generating, unless it asks for less "
        "itself (tritonclient's timeout=). When it passes, the request gets an UNAVAILABLE error that says so and "
        "its KV-cache slot goes to the next request. This is what bounds a plain HTTP request whose client went "
        "away, which Triton never notices. 0: no limit.",
    )
    drain_seconds: int = Field(
        default=30,
        ge=0,
        le=86400,
        description="How long a replica that is told to stop (a scale-down, a rollout, a node drain) goes on serving "
        "the requests it already holds, queued and generating, before it exits (Triton's --exit-timeout-secs). "
        f"First it waits {PRESTOP_SECONDS} s (a preStop hook that runs sleep in the Triton image) for the Service to "
        "stop sending it requests; then Triton refuses new ones and reports not ready. The pod's "
        f"terminationGracePeriodSeconds is this plus {PRESTOP_SECONDS + EXIT_MARGIN_SECONDS} s. Set it at least as long as your longest generation (or serving.requestTimeoutSeconds), "
        "or requests still running when it passes are cut off.",
    )
    prefix_sharing: bool = Field(
        default=True,
        description="Text generation: when a prompt that joins starts with tokens another sequence's KV cache already "
        "holds (a shared system prompt, a conversation's earlier turns, the same prompt again), copy their keys and "
        "values into its slot instead of prefilling them (at least 16 tokens; its last token is always prefilled). "
        "The completions are the same either way; false prefills every prompt whole.",
    )
    prefill_chunk_tokens: int = Field(
        default=DEFAULT_PREFILL_TOKENS,
        ge=1,
        le=1_048_576,
        description="Text generation: prompt tokens the scheduler prefills per iteration, across the prompts that "
        "join. A longer prompt is prefilled in chunks of this size, the running sequences decoding a token between "
        "its chunks, so one long prompt delays the others' next token by a chunk's prefill rather than by its "
        "whole prompt's (chunked prefill). Smaller: steadier inter-token latency for running streams; larger: "
        "sooner first tokens for long prompts.",
    )
    engine_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Text generation on the CPU (gpusPerReplica 0): threads of the engine in the scheduler's model. "
        "0 takes the Triton container's CPU limit (serving.resources.limits.cpu, rounded up) where it is below the "
        "node's CPUs, else ONNX Runtime's default of a thread per physical core. Set it below the limit to leave "
        "CPU to Triton and to other containers; set only with gpusPerReplica 0.",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="CPU and memory requests and limits of the Triton container. " + _defaults_text(TRITON_RESOURCES),
    )
    init_resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="Requests and limits of the init container that writes Triton's model repository. "
        + _defaults_text(REPOSITORY_RESOURCES),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels for the build Job and the Triton pods alike, so an engine is built on the GPU type "
        "it runs on (e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for the build Job and the Triton pods alike."
    )


# ---------------------------------------------------------------- spec.autoscaling
class ScalingPolicy(_Model):
    """One HPA scaling policy (autoscaling/v2 HPAScalingPolicy)."""

    type: Literal["Pods", "Percent"] = Field(description="Pods (a count) or Percent (of current replicas).")
    value: int = Field(ge=1, description="How many pods, or what percent, may change in one period.")
    period_seconds: int = Field(ge=1, le=1800, description="Length of the period the value applies to.")


class ScalingRules(_Model):
    """Scale-up or scale-down behaviour (autoscaling/v2 HPAScalingRules)."""

    stabilization_window_seconds: Optional[int] = Field(
        default=None, ge=0, le=3600, description="The HPA uses the most conservative recommendation within this window."
    )
    select_policy: Optional[Literal["Max", "Min", "Disabled"]] = Field(
        default=None, description="Which policy wins when several apply: Max, Min, or Disabled (no scaling this way)."
    )
    policies: list[ScalingPolicy] = Field(
        default_factory=list, max_length=8, description="Limits on how fast replicas change."
    )


class ScalingBehavior(_Model):
    """Overrides of the scale-up and scale-down defaults (see docs/autoscaling.md)."""

    scale_up: Optional[ScalingRules] = Field(default=None, description="Scale-up rules; defaults react in seconds.")
    scale_down: Optional[ScalingRules] = Field(
        default=None, description="Scale-down rules; defaults wait minutes so the replica count does not flap."
    )


class AutoscalingSpec(_Model):
    """Scale Triton on GPU utilization (DCGM) and, optionally, Triton's queue-to-compute ratio."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.minReplicas <= self.maxReplicas",
                    "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
                    ".minReplicas",
                ),
                cel(
                    "self.metricsBackend != 'keda' || has(self.prometheusAddress)",
                    "autoscaling.prometheusAddress is required when autoscaling.metricsBackend is keda",
                    ".prometheusAddress",
                ),
            ]
        }
    )

    enabled: bool = Field(default=False, description="Create a HorizontalPodAutoscaler (or KEDA ScaledObject).")
    min_replicas: int = Field(default=1, ge=1, description="Fewest Triton replicas while autoscaling.")
    max_replicas: int = Field(default=4, ge=1, description="Most Triton replicas while autoscaling.")
    target_gpu_utilization: int = Field(
        default=70,
        ge=1,
        le=100,
        alias="targetGPUUtilization",
        description="Average GPU utilization (DCGM_FI_DEV_GPU_UTIL, percent) the autoscaler keeps each replica at.",
    )
    target_queue_ratio: Optional[float] = Field(
        default=None,
        gt=0,
        le=100,
        description="Optional second signal, which reacts to saturation sooner than GPU utilization (e.g. 0.5). "
        "Text generation: requests waiting for a KV-cache slot per slot (deepseek_scheduler_queue_ratio). "
        "Classification and embeddings: Triton's queue time over compute time (triton_queue_compute_ratio).",
    )
    metrics_backend: Literal["prometheus-adapter", "keda"] = Field(
        default="prometheus-adapter",
        description="prometheus-adapter (an autoscaling/v2 HPA on custom pod metrics) or keda (a KEDA ScaledObject "
        "that queries Prometheus itself).",
    )
    prometheus_address: Optional[str] = Field(
        default=None,
        description="Prometheus URL for metricsBackend keda (e.g. http://prometheus-operated.monitoring:9090).",
    )
    behavior: Optional[ScalingBehavior] = Field(
        default=None, description="Scale-up and scale-down windows and policies; sane defaults when unset."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})"
            )
        return self

    @field_validator("prometheus_address")
    @classmethod
    def _keda_needs_prometheus(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.data.get("metrics_backend") == "keda" and not v:
            raise ValueError(
                "required when metricsBackend is keda (KEDA queries Prometheus itself), "
                "e.g. http://prometheus-operated.monitoring:9090"
            )
        return v


# ---------------------------------------------------------------- spec.cache
class CacheSpec(_Model):
    """Where engines are kept. Engines outlive the DeepSeekModel, so another model with the same engine inputs reuses them."""

    claim_name: str = Field(
        default="deepseek-engine-cache",
        min_length=1,
        max_length=253,
        description="PersistentVolumeClaim that holds engines. Shared by every DeepSeekModel that names it.",
    )
    size: Optional[str] = Field(
        default="100Gi",
        json_schema_extra={"pattern": QUANTITY_PATTERN},
        description="If set, the operator creates the claim with this size when it does not exist (it is never "
        "deleted with a model). Set to null to require an existing claim.",
    )
    storage_class_name: Optional[str] = Field(
        default=None, description="Storage class of a claim the operator creates; the cluster default if unset."
    )
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = Field(
        default="ReadWriteMany",
        description="Access mode of a claim the operator creates. ReadWriteMany lets replicas on many nodes share it.",
    )

    @field_validator("size")
    @classmethod
    def _quantity(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(QUANTITY_PATTERN, v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 100Gi)")
        return v


# ---------------------------------------------------------------- spec
class DeepSeekModelSpec(_Model):
    """Desired state of a DeepSeekModel: a checkpoint, its engine, and how Triton serves it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.serving.dynamicBatching.preferredBatchSizes) || "
                    "self.serving.dynamicBatching.preferredBatchSizes.all(s, s <= self.engine.maxBatchSize)",
                    "serving.dynamicBatching.preferredBatchSizes must each be at most engine.maxBatchSize",
                    ".serving.dynamicBatching.preferredBatchSizes",
                ),
                cel(
                    "self.engine.backend != 'tensorrt' || self.serving.gpusPerReplica >= 1",
                    "engine.backend tensorrt needs serving.gpusPerReplica >= 1; use onnxruntime to serve on CPU",
                    ".serving.gpusPerReplica",
                ),
                cel(
                    "!has(self.serving.engineThreads) || self.serving.engineThreads == 0 || "
                    "(has(self.serving.gpusPerReplica) && self.serving.gpusPerReplica == 0)",
                    ENGINE_THREADS_ON_GPU,
                    ".serving.engineThreads",
                ),
            ]
        }
    )

    model: ModelSpec = Field(description="The checkpoint to serve.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="How the engine is built.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="How Triton serves the engine.")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Horizontal autoscaling of the Triton replicas."
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Where built engines are kept and reused.")

    @model_validator(mode="after")
    def _cross_field(self) -> "DeepSeekModelSpec":
        too_big = [s for s in self.serving.dynamic_batching.preferred_batch_sizes if s > self.engine.max_batch_size]
        if too_big:
            raise ValueError(
                f"serving.dynamicBatching.preferredBatchSizes {too_big} exceed engine.maxBatchSize "
                f"({self.engine.max_batch_size})"
            )
        if self.engine.backend == "tensorrt" and self.serving.gpus_per_replica < 1:
            raise ValueError(
                "engine.backend tensorrt needs serving.gpusPerReplica >= 1; use onnxruntime to serve on CPU"
            )
        if self.serving.engine_threads and self.serving.gpus_per_replica:
            raise ValueError(ENGINE_THREADS_ON_GPU)
        return self


# ---------------------------------------------------------------- status
Phase = Literal["Pending", "Building", "Deploying", "Ready", "Failed"]


class Condition(_Model):
    """A Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="EngineBuilt, Serving or Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="What happened, and what to do about it.")
    last_transition_time: Optional[str] = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: Optional[int] = Field(default=None, description="The spec generation this reflects.")


class EngineStatus(_Model):
    """The engine Triton serves (or is being built)."""

    cache_key: Optional[str] = Field(default=None, description="Content key of the engine inputs.")
    location: Optional[str] = Field(default=None, description="Where the engine lives (pvc://claim/path).")
    build_job: Optional[str] = Field(default=None, description="Name of the build Job, when one ran.")
    built_at: Optional[str] = Field(default=None, description="When the engine was built (RFC 3339).")
    build_seconds: Optional[float] = Field(default=None, description="How long the build Job ran.")
    reused: Optional[bool] = Field(default=None, description="True when the engine came from the cache with no build.")


class EndpointsStatus(_Model):
    """In-cluster URLs of the Triton Service."""

    http: Optional[str] = Field(default=None, description="KServe v2 HTTP/REST endpoint.")
    grpc: Optional[str] = Field(default=None, description="KServe v2 gRPC endpoint.")
    metrics: Optional[str] = Field(default=None, description="Prometheus metrics endpoint.")


class AutoscalingStatus(_Model):
    """What the HorizontalPodAutoscaler reports."""

    current_replicas: Optional[int] = Field(default=None, description="Replicas the autoscaler sees now.")
    desired_replicas: Optional[int] = Field(default=None, description="Replicas the autoscaler wants.")


class DeepSeekModelStatus(_Model):
    """Observed state, written by the operator."""

    phase: Optional[Phase] = Field(default=None, description="Pending, Building, Deploying, Ready or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="EngineBuilt, Serving and Ready.")
    observed_generation: Optional[int] = Field(default=None, description="The spec generation last reconciled.")
    engine: Optional[EngineStatus] = Field(default=None, description="The engine being served or built.")
    endpoints: Optional[EndpointsStatus] = Field(default=None, description="Where clients reach Triton.")
    replicas: Optional[int] = Field(default=None, description="Triton pods that exist.")
    ready_replicas: Optional[int] = Field(default=None, description="Triton pods that are ready.")
    autoscaling: Optional[AutoscalingStatus] = Field(default=None, description="The autoscaler's view.")


# ---------------------------------------------------------------- parsing
def _wire_name(part: Any) -> str:
    """A location part as the user wrote it: pydantic reports defaulted fields by their Python name."""
    if isinstance(part, str) and "_" in part:
        for model in _Model.__subclasses__():
            field = model.model_fields.get(part)
            if field is not None and field.alias:
                return field.alias
        return to_camel(part)
    return str(part)


def format_validation_error(exc: ValidationError, prefix: str = "spec") -> list[str]:
    """Turn pydantic's errors into 'spec.engine.maxBatchSize: ...' lines."""
    problems = []
    for err in exc.errors():
        path = ".".join([prefix] + [_wire_name(p) for p in err["loc"]])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `kubectl explain deepseekmodel.spec` lists the fields)"
        elif err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
            msg = f"must be one of {err['ctx']['expected']}, got {err.get('input')!r}"
        problems.append(f"{path}: {msg}")
    return problems


def parse_spec(spec: Any) -> DeepSeekModelSpec:
    """Validate a ``spec`` dict from the API or a file; raise SpecError naming the fields."""
    if not isinstance(spec, dict):
        raise SpecError(["spec: must be a mapping"])
    try:
        return DeepSeekModelSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class DeepSeekModel(BaseModel):
    """A whole custom resource as read from a file: name, namespace and validated spec."""

    name: str
    namespace: str = "default"
    uid: Optional[str] = None
    generation: Optional[int] = None
    labels: dict[str, str] = {}
    spec: DeepSeekModelSpec


def parse_resource(obj: Any) -> DeepSeekModel:
    """Validate a whole DeepSeekModel object (apiVersion, kind, metadata.name, spec)."""
    problems: list[str] = []
    if not isinstance(obj, dict):
        raise SpecError([f"the document must be a mapping with apiVersion, kind, metadata and spec, "
                         f"got {_kind_of(obj)}"])
    if obj.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION}, got {obj.get('apiVersion')!r}")
    if obj.get("kind") != KIND:
        problems.append(f"kind: must be {KIND}, got {obj.get('kind')!r}")
    meta = obj.get("metadata")
    name = namespace = None
    labels: dict[str, str] = {}
    if meta is None:
        problems.append("metadata.name: required")
    elif not isinstance(meta, dict):
        problems.append(f"metadata: must be a mapping with name (and namespace), got {_kind_of(meta)}")
    else:
        name, namespace = meta.get("name"), meta.get("namespace")
        if name is None or name == "":
            problems.append("metadata.name: required")
        elif not isinstance(name, str):
            problems.append(f"metadata.name: must be a string, got {_kind_of(name)} {name!r}")
        elif len(name) > 63 or not NAME_PATTERN.match(name):
            problems.append(
                f"metadata.name: {name!r} must be at most 63 lowercase letters, digits and '-', starting and ending "
                "with a letter or digit"
            )
        if namespace is not None and (not isinstance(namespace, str) or not NAME_PATTERN.match(namespace)):
            problems.append(f"metadata.namespace: {namespace!r} must be a namespace name (lowercase letters, digits "
                            "and '-')")
        raw_labels = meta.get("labels")
        if raw_labels is not None:
            if not isinstance(raw_labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in raw_labels.items()):
                problems.append("metadata.labels: must be a mapping of strings to strings")
            else:
                labels = raw_labels
    spec = None
    if "spec" not in obj:
        problems.append("spec: required (at least spec.model.source)")
    else:
        try:
            spec = parse_spec(obj.get("spec"))
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    return DeepSeekModel(
        name=name,
        namespace=namespace or "default",
        uid=meta.get("uid"),
        generation=meta.get("generation"),
        labels=labels,
        spec=spec,
    )


def _kind_of(value: Any) -> str:
    """A YAML reader's name for a value's type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return type(value).__name__


#: A DeepSeekModel file larger than this is refused before it is parsed.
MAX_FILE_BYTES = 1 << 20


def load_resource_file(path: str) -> DeepSeekModel:
    """Read the DeepSeekModel in a YAML file; every problem is a SpecError whose lines name the file or the field."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: is a directory, not a YAML file"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError([f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; a DeepSeekModel is a few lines"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{path}: not valid YAML{where}: {problem}"]) from None
    except RecursionError:
        raise SpecError([f"{path}: nested too deeply to be a DeepSeekModel"]) from None
    if not docs:
        raise SpecError([f"{path}: is empty; it needs a {KIND} (apiVersion, kind, metadata, spec)"])
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return parse_resource(doc)
    if len(docs) == 1:
        if isinstance(doc, list):
            raise SpecError([f"{path}: holds a list; write the {KIND} as a mapping with apiVersion, kind, "
                             "metadata and spec (one document, or documents separated by ---)"])
        return parse_resource(docs[0])  # names what is wrong: kind, apiVersion, metadata, spec
    kinds = ", ".join(sorted({str(d.get("kind")) for d in docs if isinstance(d, dict)})) or "none"
    raise SpecError([f"{path}: holds no {KIND} document (kinds found: {kinds})"])
