"""Operator configuration: the images it deploys and what it watches (set by the Helm chart's env vars)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

from deepseek_contract.versions import BUILDER_IMAGE, OPERATOR_IMAGE

#: Image of the engine-build Job (the operator package with the ``builder`` extra).
DEFAULT_BUILDER_IMAGE = BUILDER_IMAGE
#: Image of the Triton pods' init container, which writes the model repository.
DEFAULT_OPERATOR_IMAGE = OPERATOR_IMAGE


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the renderers need besides the DeepSeekModel itself."""

    builder_image: str = DEFAULT_BUILDER_IMAGE
    operator_image: str = DEFAULT_OPERATOR_IMAGE
    #: Namespaces to watch; empty means all namespaces.
    watch_namespaces: tuple[str, ...] = field(default_factory=tuple)
    #: Port of the operator's own Prometheus metrics (0 disables them).
    metrics_port: int = 8080
    #: A build Job that runs longer than this fails (a TensorRT build of a large model takes about an hour).
    build_deadline_seconds: int = 3 * 3600
    #: Retries of a failed build pod before the Job fails (the operator never recreates a failed Job).
    build_backoff_limit: int = 1
    #: Image pull policy of the operator-built containers (None leaves Kubernetes' default).
    image_pull_policy: Optional[str] = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "OperatorConfig":
        """Read DEEPSEEK_BUILDER_IMAGE, DEEPSEEK_OPERATOR_IMAGE and WATCH_NAMESPACES (comma list; empty = all)."""
        env = os.environ if env is None else env
        values: dict = {}
        if env.get("DEEPSEEK_BUILDER_IMAGE"):
            values["builder_image"] = env["DEEPSEEK_BUILDER_IMAGE"]
        if env.get("DEEPSEEK_OPERATOR_IMAGE"):
            values["operator_image"] = env["DEEPSEEK_OPERATOR_IMAGE"]
        namespaces = [n.strip() for n in env.get("WATCH_NAMESPACES", "").split(",") if n.strip()]
        values["watch_namespaces"] = tuple(namespaces)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
