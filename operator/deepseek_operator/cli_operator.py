"""``deepseek-operator run | render | crd``: the operator process, and its renderers without a cluster."""

from __future__ import annotations

import sys
from typing import Optional

import click
import yaml

from .api import SpecError, load_resource_file
from .config import OperatorConfig


def _liveness_url(value: Optional[str]) -> Optional[str]:
    """``host:port`` (or a full URL) -> kopf's liveness endpoint URL."""
    if not value:
        return None
    if "://" in value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not host:port (e.g. 0.0.0.0:8081)", param_hint="--liveness")
    return f"http://{host or '0.0.0.0'}:{port}/healthz"


@click.command("run")
@click.option("-n", "--namespace", "namespaces", multiple=True,
              help="Watch this namespace (repeatable). Default: $WATCH_NAMESPACES, else all namespaces.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch every namespace (cluster-wide).")
@click.option("--liveness", metavar="HOST:PORT", help="Serve kopf's liveness probe at http://HOST:PORT/healthz.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Port of the operator's Prometheus metrics (0 disables). Default 8080.")
@click.option("--builder-image", envvar="DEEPSEEK_BUILDER_IMAGE", help="Image of the engine-build Jobs.")
@click.option("--operator-image", envvar="DEEPSEEK_OPERATOR_IMAGE", help="Image of the Triton pods' init container.")
def run(namespaces: tuple[str, ...], all_namespaces: bool, liveness: Optional[str], metrics_port: Optional[int],
        builder_image: Optional[str], operator_image: Optional[str]) -> None:
    """Start the operator (standalone: one instance, no kopf peering)."""
    if namespaces and all_namespaces:
        raise click.UsageError("use either --namespace or --all-namespaces, not both")
    liveness_url = _liveness_url(liveness)
    config = OperatorConfig.from_env(
        builder_image=builder_image,
        operator_image=operator_image,
        metrics_port=metrics_port,
        watch_namespaces=tuple(namespaces) or None,
    )
    if all_namespaces:
        config = OperatorConfig(**{**config.__dict__, "watch_namespaces": ()})
    from .handlers import run_operator

    run_operator(config, liveness_url=liveness_url)


@click.command("render")
@click.option("-f", "--filename", required=True, type=click.Path(),
              help="A YAML file holding a DeepSeekModel.")
@click.option("--builder-image", envvar="DEEPSEEK_BUILDER_IMAGE", help="Image of the engine-build Job.")
@click.option("--operator-image", envvar="DEEPSEEK_OPERATOR_IMAGE", help="Image of the Triton pods' init container.")
def render(filename: str, builder_image: Optional[str], operator_image: Optional[str]) -> None:
    """Print the objects the operator creates for a DeepSeekModel, as multi-document YAML (no cluster needed)."""
    from . import render as renderers

    try:
        model = load_resource_file(filename)
        config = OperatorConfig.from_env(builder_image=builder_image, operator_image=operator_image)
        objs = renderers.render_children(model, config)
    except SpecError as exc:
        # One line, whatever the file holds: the problems name the file or the fields.
        click.echo(f"error: {filename}: invalid DeepSeekModel: " + "; ".join(exc.problems), err=True)
        sys.exit(2)
    click.echo(yaml.safe_dump_all(objs, sort_keys=False), nl=False)


@click.command("crd")
def crd() -> None:
    """Print the DeepSeekModel CustomResourceDefinition (generated from the API)."""
    from .crd import render_crd_yaml

    click.echo(render_crd_yaml(), nl=False)
