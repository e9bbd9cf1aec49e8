"""Generate the DeepSeekModel CRD from the pydantic models in ``api.py``.

Pydantic's JSON schema is close to, but not, a Kubernetes structural schema: refs
must be inlined, ``anyOf: [X, null]`` becomes plain X, titles go, and each object's
CEL rules ride along as ``x-kubernetes-validations``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import api

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Inline refs and reduce a pydantic JSON-schema node to a Kubernetes structural schema node."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # Field-level description and default win over the model's docstring.
        target.update({k: v for k, v in node.items() if k in ("description", "default")})
        node = target
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {options} structurally")
        merged = _structural(options[0], defs)
        merged.update({k: v for k, v in node.items() if k in ("description", "pattern")})
        if "default" in node and node["default"] is not None:
            merged["default"] = node["default"]
        node = merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "default" and value is None:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "additionalProperties" and not isinstance(value, dict):
            continue  # `extra="forbid"`: kubectl's strict field validation refuses unknown fields instead
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        else:
            out[key] = copy.deepcopy(value)
    if out.get("type") == "number" and "format" not in out:
        out["format"] = "double"
    if "properties" in out:
        out["type"] = "object"
    # OpenAPI 3.0 (the API server's dialect) has boolean exclusive bounds beside minimum/maximum;
    # pydantic writes JSON Schema 2020-12's numeric ones (gt=0 -> exclusiveMinimum: 0).
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if exclusive in out and not isinstance(out[exclusive], bool):
            out[bound] = out.pop(exclusive)
            out[exclusive] = True
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, as the API server expects it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _spec_schema() -> dict[str, Any]:
    schema = openapi_schema(api.DeepSeekModelSpec)
    # Let the API server fill nested defaults (so CEL rules can read engine.maxBatchSize without has()).
    for name in ("engine", "serving", "autoscaling", "cache"):
        schema["properties"][name]["default"] = {}
    serving = schema["properties"]["serving"]["properties"]
    serving["dynamicBatching"]["default"] = {}
    serving["resources"]["default"] = {}
    return schema


def _status_schema() -> dict[str, Any]:
    schema = openapi_schema(api.DeepSeekModelStatus)
    # kopf keeps its handler progress under status (kopf: {...}) unless told otherwise: let unknown fields through.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "Checkpoint source."},
    {"name": "Backend", "type": "string", "jsonPath": ".spec.engine.backend", "priority": 1,
     "description": "tensorrt or onnxruntime."},
    {"name": "Precision", "type": "string", "jsonPath": ".spec.engine.precision", "description": "Engine precision."},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas", "description": "Triton pods."},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
     "description": "Whether the model serves."},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def render_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object for DeepSeekModel."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "deepseek-operator", "app.kubernetes.io/part-of": "deepseek-operator"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "deepseek"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A DeepSeek model built into a TensorRT or ONNX Runtime engine and served "
                            "by Triton Inference Server.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "deepseek.ai/v1alpha1"},
                                "kind": {"type": "string", "description": "DeepSeekModel"},
                                "metadata": {"type": "object"},
                                "spec": _spec_schema(),
                                "status": _status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as YAML, with a header saying it is generated."""
    header = "# Generated from operator/deepseek_operator/api.py by `deepseek-operator crd`. Do not edit by hand.\n"
    return header + yaml.safe_dump(render_crd(), sort_keys=False, width=120)
