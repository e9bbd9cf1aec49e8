"""file:// and pvc:// folders are checked (config.json, architecture, context length, weights, size) before
anything in them is hashed; a refused folder leaves nothing in the hash index or the cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepseek_builder import sources
from deepseek_builder.cli import build


def cli(source: str, cache: Path, *extra: str):
    return CliRunner().invoke(build, ["--source", source, "--backend", "onnxruntime", "--precision", "fp32",
                                      "--max-batch-size", "2", "--output", str(cache.parent / "out"),
                                      "--cache-dir", str(cache), *extra])


def checkpoint(folder: Path, **config) -> Path:
    """A folder that passes the cheap checks: config.json and a (never opened) safetensors file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "max_position_embeddings": 4096,
                                                    **config}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def nothing_hashed(cache: Path) -> bool:
    index = cache / "file-hashes.json"
    return not index.exists() or json.loads(index.read_text()) == {}


@pytest.mark.skipif(not Path("/usr/share").is_dir(), reason="needs a large system folder")
def test_usr_share_is_refused_in_well_under_a_second_without_hashing(tmp_path):
    cache = tmp_path / "cache"
    start = time.monotonic()
    result = cli("file:///usr/share", cache, "--max-seq-len", "64")
    elapsed = time.monotonic() - start
    assert result.exit_code == 1
    assert "/usr/share has no config.json; is it a Hugging Face checkpoint folder?" in result.output
    assert elapsed < 1.0, elapsed
    assert nothing_hashed(cache) and not list((cache / "engines").iterdir())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: checkpoint(d, model_type="gpt2"), "architecture 'gpt2' is not supported"),
        (lambda d: (checkpoint(d) / "model.safetensors").unlink(), "no *.safetensors weights found"),
        (lambda d: (checkpoint(d) / "model.safetensors").rename(d / "pytorch_model.bin"),
         "only PyTorch .bin weights found"),
        (lambda d: (checkpoint(d) / "config.json").write_text("{"), "config.json: not valid JSON"),
    ],
    ids=["architecture", "no-weights", "bin-weights", "bad-config"],
)
def test_a_folder_that_is_not_a_supported_checkpoint_is_refused_before_hashing(tmp_path, make, message):
    folder = tmp_path / "model"
    make(folder)
    cache = tmp_path / "cache"
    result = cli(f"file://{folder}", cache, "--max-seq-len", "64")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and nothing_hashed(cache)


def test_a_folder_with_too_many_files_is_refused_before_hashing(tmp_path):
    folder = checkpoint(tmp_path / "model")
    (folder / "junk").mkdir()
    for i in range(sources.MAX_FOLDER_FILES):
        (folder / "junk" / str(i)).touch()
    cache = tmp_path / "cache"
    result = cli(f"file://{folder}", cache, "--max-seq-len", "64")
    assert result.exit_code == 1
    assert f"holds more than {sources.MAX_FOLDER_FILES} files, far more than one checkpoint" in result.output
    assert nothing_hashed(cache)


def test_context_beyond_the_models_positions_is_refused_with_both_numbers(tmp_path):
    folder = checkpoint(tmp_path / "model")
    cache = tmp_path / "cache"
    result = cli(f"file://{folder}", cache, "--max-seq-len", "1048576")
    assert result.exit_code == 1
    assert "maxSequenceLength (--max-seq-len) 1048576 is above the model's max_position_embeddings 4096" in result.output
    assert "set it to 4096 or less" in result.output
    assert "download: started" not in result.output and nothing_hashed(cache)


def test_max_positions_is_read_from_a_text_config_too():
    from deepseek_builder.architectures import max_positions

    assert max_positions({"max_position_embeddings": 163840}) == 163840
    assert max_positions({"text_config": {"max_position_embeddings": 2048}}) == 2048
    assert max_positions({}) is None
