"""The table of a DeepSeekModel's children: one entry per kind, each with a pure renderer.

``reconcile.sync`` walks the table in order: it applies what a renderer returns
(server-side apply, or create-if-absent for the kinds Kubernetes does not let
change), and deletes a prunable child whose renderer returns None.  Renderers
take the model, the operator config and a :class:`Desired` (the decision made
from what was observed); they never talk to the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from . import autoscaling, naming, render
from .api import DeepSeekModel
from .config import OperatorConfig


@dataclass(frozen=True)
class Desired:
    """What the reconcile decided: the engine key, whether to start its build, which engine to serve."""

    key: str
    #: This model holds the build claim and its Job should exist.
    build: bool = False
    #: The engine key the Triton Deployment serves (None: nothing built yet, nothing to serve).
    serve: Optional[str] = None
    #: The engine of ``key`` is built: the cache claim is no longer needed for a build (its pods already mount it).
    built: bool = False


Renderer = Callable[[DeepSeekModel, OperatorConfig, Desired], Optional[dict[str, Any]]]


@dataclass(frozen=True)
class ChildKind:
    """One kind of child and how the sync treats it."""

    kind: str
    render: Renderer
    #: apply: server-side apply on every reconcile (drift is repaired); create: create (a Job's template is
    #: immutable; an existing one is kept); ensure: read, and create when absent (the shared cache claim).
    sync: Literal["apply", "create", "ensure"]
    #: Delete the live child when the renderer returns None (the claim and build Jobs outlive the decision).
    prune: bool
    #: Name of the child, for pruning (None: not prunable).
    name: Optional[Callable[[DeepSeekModel], str]] = None
    #: Part of what Triton serves: only pruned once something was served.
    serving: bool = False


def _claim(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> Optional[dict[str, Any]]:
    return None if desired.built else render.render_cache_claim(model)


def _job(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> Optional[dict[str, Any]]:
    return render.render_build_job(model, config, desired.key) if desired.build else None


def _deployment(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> Optional[dict[str, Any]]:
    return render.render_deployment(model, config, desired.serve) if desired.serve else None


def _service(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> Optional[dict[str, Any]]:
    return render.render_service(model) if desired.serve else None


def _pdb(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> Optional[dict[str, Any]]:
    return render.render_pdb(model) if desired.serve else None


def _autoscaler(kind: str) -> Renderer:
    def render_kind(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> Optional[dict[str, Any]]:
        if not desired.serve:
            return None
        return next((o for o in render.render_autoscaler(model) if o["kind"] == kind), None)

    render_kind.__name__ = f"render_{kind.lower()}"
    return render_kind


def _triton(model: DeepSeekModel) -> str:
    return naming.triton_name(model.name)


#: In sync order: the claim before the Job that mounts it, the Deployment before what selects or scales it.
CHILDREN: tuple[ChildKind, ...] = (
    ChildKind("PersistentVolumeClaim", _claim, sync="ensure", prune=False),
    ChildKind("Job", _job, sync="create", prune=False),
    ChildKind("Deployment", _deployment, sync="apply", prune=True, name=_triton, serving=True),
    ChildKind("Service", _service, sync="apply", prune=True, name=_triton, serving=True),
    ChildKind("PodDisruptionBudget", _pdb, sync="apply", prune=True, name=_triton, serving=True),
    ChildKind("HorizontalPodAutoscaler", _autoscaler("HorizontalPodAutoscaler"), sync="apply", prune=True,
              name=_triton, serving=True),
    ChildKind("ScaledObject", _autoscaler("ScaledObject"), sync="apply", prune=True, name=_triton, serving=True),
)

AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")


def render_all(model: DeepSeekModel, config: OperatorConfig, desired: Desired) -> list[tuple[ChildKind, Optional[dict]]]:
    """Every child kind with its rendering (None: should not exist) for ``desired``."""
    return [(child, child.render(model, config, desired)) for child in CHILDREN]


def keda_hpa_name(model: DeepSeekModel) -> str:
    """The HPA whose status reports the replica counts (KEDA names its own)."""
    return autoscaling.autoscaler_hpa_name(model)
