"""``deepseek-operator repository``: write a Triton model repository for a built engine.

The Triton pods' init container runs this in the cluster, so a serving change
(batching, instance count) rewrites the repository without rebuilding the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from deepseek_contract.integrity import verify_entry

from .repository import (DEFAULT_PREFILL_TOKENS, DEFAULT_QUEUE_DELAY_US, DEFAULT_STREAM_INTERVAL, RepositoryError,
                         default_queue_delay_us, resolve_engine_ref, write_repository)


@click.command("repository")
@click.option("--engine-dir", type=click.Path(file_okay=False, path_type=Path), help="A built engine directory.")
@click.option(
    "--engine-ref",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A cache ref, <cache>/refs/<key>.json, naming the engine directory.",
)
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Repository to write.")
@click.option("--model-name", required=True, help="The name clients call (the DeepSeekModel's name).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=None,
              help="Triton's queue delay in microseconds (default: "
              f"{default_queue_delay_us('text-generation')} for text generation, whose scheduler batches by itself; "
              f"{DEFAULT_QUEUE_DELAY_US} for classification and embeddings).")
@click.option("--preferred-batch-size", "preferred_batch_sizes", type=click.IntRange(min=1), multiple=True)
@click.option("--no-dynamic-batching", is_flag=True, help="Serve one request per execution.")
@click.option("--stream-interval", type=click.IntRange(min=1), default=DEFAULT_STREAM_INTERVAL, show_default=True,
              help="Text generation: tokens per streamed response (the first token is always sent at once).")
@click.option("--engine-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Text generation on the CPU: threads of the scheduler's engine; 0 takes the container's CPU limit, "
              "else a thread per physical core.")
@click.option("--request-timeout-seconds", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Text generation: the longest a request may take unless it asks for less itself; 0: no limit.")
@click.option("--prefill-chunk-tokens", type=click.IntRange(min=1), default=DEFAULT_PREFILL_TOKENS, show_default=True,
              help="Text generation: prompt tokens prefilled per scheduler iteration; a longer prompt is prefilled in "
              "chunks, the running sequences decoding between them.")
@click.option("--no-prefix-sharing", is_flag=True,
              help="Text generation: prefill every prompt whole, never copying its start from another sequence's cache.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs per replica.")
@click.option("--instance-count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runtime", type=click.Choice(["triton", "local"]), default="triton", show_default=True)
@click.option("--copy", "copy_files", is_flag=True, help="Copy engine files instead of symlinking them.")
def repository(
    engine_dir: Optional[Path],
    engine_ref: Optional[Path],
    output: Path,
    model_name: str,
    max_queue_delay_us: Optional[int],
    preferred_batch_sizes: tuple[int, ...],
    no_dynamic_batching: bool,
    stream_interval: int,
    engine_threads: int,
    request_timeout_seconds: float,
    prefill_chunk_tokens: int,
    no_prefix_sharing: bool,
    gpus: int,
    instance_count: int,
    runtime: str,
    copy_files: bool,
) -> None:
    """Write the Triton model repository (config.pbtxt and Python models) for a built engine."""
    if (engine_dir is None) == (engine_ref is None):
        raise click.UsageError("give exactly one of --engine-dir or --engine-ref")
    try:
        if engine_ref is not None:
            engine_dir = resolve_engine_ref(engine_ref)
            problem = verify_entry(engine_dir)
            if problem:
                raise click.ClickException(
                    f"engine {engine_dir} (from {engine_ref}) is not served: {problem}. Rebuild it: a "
                    "`deepseek-operator build` of the same inputs with --cache-dir on this volume (the build Job's "
                    "command) discards a damaged engine and builds it again")
        out = write_repository(
            engine_dir,
            output,
            model_name,
            runtime=runtime,
            max_queue_delay_us=max_queue_delay_us,
            preferred_batch_sizes=list(preferred_batch_sizes),
            gpus=gpus,
            instance_count=instance_count,
            dynamic_batching=not no_dynamic_batching,
            stream_interval=stream_interval,
            engine_threads=engine_threads,
            request_timeout_s=request_timeout_seconds,
            prefill_chunk_tokens=prefill_chunk_tokens,
            share_prefixes=not no_prefix_sharing,
            link=not copy_files,
        )
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from None
    models = sorted(p.name for p in out.iterdir() if (p / "config.pbtxt").exists())
    click.echo(f"wrote {out}: {', '.join(models)}")
