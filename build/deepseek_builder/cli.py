"""`deepseek-operator build` and `deepseek-operator dev`: torch and friends are imported inside the commands."""

from __future__ import annotations

import errno
import sys

import click

from deepseek_contract.vocabulary import ARCHITECTURES, BACKENDS, PRECISIONS, TASKS


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


@click.command("build")
@click.option("--source", required=True, help="Checkpoint: hf://org/name, s3://bucket/prefix, pvc://claim/path or "
              "file:///path.")
@click.option("--revision", default=None, help="Branch, tag or commit of an hf:// source.")
@click.option("--adapter", default=None, help="A PEFT LoRA adapter (same URI schemes), merged before export.")
@click.option("--adapter-revision", default=None, help="Revision of an hf:// adapter.")
@click.option("--task", type=click.Choice(TASKS), default="text-generation", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), required=True)
@click.option("--precision", type=click.Choice(PRECISIONS), required=True)
@click.option("--max-batch-size", type=click.IntRange(1, 1024), required=True)
@click.option("--max-seq-len", type=click.IntRange(2, 1048576), required=True)
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False),
              help="Where the Triton model repository and build-report.json are written.")
@click.option("--cache-dir", default=None, help="Engine cache (default $DEEPSEEK_OPERATOR_CACHE, else "
              "~/.cache/deepseek-operator).")
@click.option("--gpu-type", default=None, help="The GPU type the engine is for, as the operator keys it (the "
              "nvidia.com/gpu.product label); default 'cpu' for onnxruntime, 'any-gpu' for tensorrt.")
@click.option("--model-name", default="deepseek", show_default=True, help="Triton model name in the repository.")
@click.option("--runtime", type=click.Choice(["triton", "local"]), default="triton", show_default=True,
              help="triton: native engine backend (cluster image); local: the engine in a Python model (local mode).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=None,
              help="Dynamic batching: longest wait to form a batch, in microseconds (default: 0 for text generation, "
              "whose scheduler batches by itself; 1000 for classification and embeddings).")
@click.option("--preferred-batch-size", "preferred_batch_sizes", type=click.IntRange(1), multiple=True,
              help="Dynamic batching: a batch size to aim for (repeatable).")
@click.option("--instance-count", type=click.IntRange(1), default=1, show_default=True,
              help="Engine model instances per Triton server.")
def build(source, revision, adapter, adapter_revision, task, backend, precision, max_batch_size, max_seq_len,
          output_dir, cache_dir, gpu_type, model_name, runtime, max_queue_delay_us, preferred_batch_sizes,
          instance_count):
    """Build a checkpoint into a cached engine and a Triton model repository in --output."""
    import signal

    from .errors import BuildError

    def _terminated(signum, frame):  # a deleted Job's pod gets SIGTERM: clean the scratch folder, then exit
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminated)
    too_big = [b for b in preferred_batch_sizes if b > max_batch_size]
    if too_big:
        _fail(f"--preferred-batch-size {too_big} exceed --max-batch-size {max_batch_size}")

    try:
        from . import api
    except ImportError as exc:
        _fail(f"the builder's dependencies are missing ({exc}): pip install 'deepseek-operator[builder]'")
    if gpu_type is None:
        gpu_type = "cpu" if backend == "onnxruntime" else "any-gpu"
    request = api.default_request(
        source=source, revision=revision, task=task, backend=backend, precision=precision,
        max_batch_size=max_batch_size, max_sequence_length=max_seq_len, adapter_source=adapter,
        adapter_revision=adapter_revision, gpu_type=gpu_type, cache_dir=cache_dir, output_dir=output_dir,
        model_name=model_name, runtime=runtime,
    )
    request.serving = {"max_queue_delay_us": max_queue_delay_us, "preferred_batch_sizes": list(preferred_batch_sizes),
                       "instance_count": instance_count}
    try:
        result = api.build(request)
    except BuildError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was added to the cache")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            _fail(f"no space left on device ({exc.filename or ''}); free space or use a bigger volume")
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - the repository writer's own errors
        if type(exc).__name__ == "RepositoryError":
            _fail(str(exc))
        raise
    what = "reused" if result.reused else "built"
    click.echo(f"engine {result.content_key} {what}: {result.engine_dir}")
    click.echo(f"model repository: {result.output_dir}")
    check = result.report.get("check", {})
    if check:
        click.echo(f"numerical check: max relative error {check.get('max_rel_error'):.2e}")


@click.group("dev")
def dev():
    """Developer helpers."""


@dev.command("tiny-model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the checkpoint into.")
@click.option("--arch", type=click.Choice(ARCHITECTURES), default="deepseek_v3", show_default=True)
@click.option("--task", type=click.Choice(TASKS), default="text-generation", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def tiny_model(out, arch, task, seed):
    """Write a tiny RANDOM-weight checkpoint with DeepSeek's real tokenizer (its output is word salad)."""
    try:
        from .tiny import TinyModelError, write_tiny_model
    except ImportError as exc:
        _fail(f"the builder's dependencies are missing ({exc}): pip install 'deepseek-operator[builder,local]'")
    try:
        path = write_tiny_model(out, arch=arch, task=task, seed=seed)
    except TinyModelError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    click.echo(f"wrote a tiny {arch} {task} model with random weights (seed {seed}) to {path}")
