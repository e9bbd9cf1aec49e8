"""Names and labels of a DeepSeekModel's children: deterministic, and within Kubernetes' limits for any valid CR name.

A CR name may be 63 characters (a DNS-1123 label).  Children add a suffix, and
some (Services, label values) must themselves stay within 63, so a name that
would overflow is cut and given a short hash of the full name, keeping it unique.
"""

from __future__ import annotations

import hashlib

MAX_NAME = 63
MANAGED_BY = "deepseek-operator"
PART_OF = "deepseek-operator"
MODEL_LABEL = "deepseek.ai/model"
ENGINE_KEY_ANNOTATION = "deepseek.ai/engine-key"
SPEC_KEY_LABEL = "deepseek.ai/engine-key"


def child_name(cr_name: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """``<cr>-<suffix>``, shortened with a hash when it would exceed ``limit``."""
    full = f"{cr_name}-{suffix}" if suffix else cr_name
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    tail = f"-{digest}-{suffix}" if suffix else f"-{digest}"
    head = cr_name[: limit - len(tail)].rstrip("-")
    return f"{head}{tail}"


def triton_name(cr_name: str) -> str:
    """Deployment, Service, HPA and PDB of the Triton server (the Service name is what clients resolve)."""
    return child_name(cr_name, "triton")


def build_job_name(cr_name: str, spec_key: str) -> str:
    """One Job per engine key: a new key (an engine change) gives a new Job; the same key never runs twice."""
    return child_name(cr_name, f"build-{spec_key[:10]}")


def triton_model_name(cr_name: str) -> str:
    """The model name clients call in Triton: the DeepSeekModel's own name."""
    return cr_name


def label_value(value: str) -> str:
    """A label value (<= 63 chars, alphanumeric at both ends)."""
    return child_name(value, "", MAX_NAME).strip("-_.") if len(value) > MAX_NAME else value


def selector_labels(cr_name: str, component: str) -> dict[str, str]:
    """The labels a Deployment selects its pods by (immutable once created: keep them few and stable)."""
    return {
        "app.kubernetes.io/name": "deepseek-model",
        "app.kubernetes.io/instance": label_value(cr_name),
        "app.kubernetes.io/component": component,
    }


def standard_labels(cr_name: str, component: str, version: str | None = None) -> dict[str, str]:
    """The recommended app.kubernetes.io/* labels plus ours, for every child."""
    labels = {
        **selector_labels(cr_name, component),
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        MODEL_LABEL: label_value(cr_name),
    }
    if version:
        labels["app.kubernetes.io/version"] = label_value(version)
    return labels
