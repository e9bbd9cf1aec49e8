"""The one console script, ``deepseek-operator``: each subsystem contributes its commands."""

from __future__ import annotations

import click

from deepseek_contract.versions import PROJECT_VERSION as __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deepseek-operator")
def main() -> None:
    """Build DeepSeek models into TensorRT / ONNX Runtime engines and serve them on Triton."""


def _register() -> None:
    from deepseek_builder.cli import build, dev
    from deepseek_model_repository.cli import repository

    from deepseek_local.local import local
    from deepseek_operator.cli_operator import crd, render, run

    for command in (run, render, crd, build, dev, repository, local):
        main.add_command(command)


_register()
