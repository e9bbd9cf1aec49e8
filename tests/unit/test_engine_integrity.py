"""Engine entries carry content hashes; whatever reuses an entry refuses one that no longer matches them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepseek_builder.cache import EngineCache
from deepseek_contract.integrity import verify_entry, write_manifest
from deepseek_model_repository.cli import repository


def staged_entry(cache: EngineCache) -> Path:
    """A small finished build in the cache's scratch: markers, an engine file, a tokenizer."""
    work = cache.new_workdir() / "entry"
    (work / "engine").mkdir(parents=True)
    (work / "tokenizer").mkdir()
    (work / "engine" / "model.onnx").write_bytes(os.urandom(4096))
    (work / "tokenizer" / "tokenizer.json").write_text("{}")
    (work / "model-info.json").write_text(json.dumps({"engine_file": "engine/model.onnx"}))
    (work / "build-report.json").write_text("{}")
    return work


@pytest.fixture()
def published(tmp_path) -> tuple[EngineCache, Path]:
    cache = EngineCache(tmp_path / "cache")
    entry, won = cache.publish(staged_entry(cache), "k1")
    assert won and (entry / "manifest.json").is_file()
    return cache, entry


def test_a_published_entry_matches_its_manifest(published):
    cache, entry = published
    manifest = json.loads((entry / "manifest.json").read_text())
    assert set(manifest["files"]) == {"engine/model.onnx", "tokenizer/tokenizer.json", "model-info.json",
                                      "build-report.json"}
    assert verify_entry(entry) is None and cache.finished("k1") == entry


def overwrite_in_place(path: Path) -> None:
    """Same size, same mtime, other bytes: what a stray `dd` or a bad disk leaves."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (overwrite_in_place, "engine/model.onnx has changed since it was built"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "engine/model.onnx is 1000 bytes, 4096 when it was built"),
        (lambda p: p.unlink(), "engine/model.onnx is missing"),
        (lambda p: (p.parent.parent / "manifest.json").unlink(), "no manifest.json: it was built before"),
        (lambda p: (p.parent.parent / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    ],
    ids=["overwritten", "truncated", "deleted", "no-manifest", "bad-manifest"],
)
def test_a_damaged_entry_is_not_reused_and_says_why(published, damage, reason):
    cache, entry = published
    damage(entry / "engine" / "model.onnx")
    found, problem = cache.inspect("k1")
    assert found is None and reason in problem
    assert cache.finished("k1") is None


def test_a_manifest_must_cover_the_engine_file(published):
    _, entry = published
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["files"]["engine/model.onnx"]
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert "does not cover engine/model.onnx" in verify_entry(entry)


def test_init_container_refuses_a_damaged_engine_with_the_reason(published, tmp_path):
    cache, entry = published
    ref = cache.write_ref("spec1", {"content_key": "k1", "engine_dir": "engines/k1"})
    overwrite_in_place(entry / "engine" / "model.onnx")
    result = CliRunner().invoke(repository, ["--engine-ref", str(ref), "--output", str(tmp_path / "repo"),
                                             "--model-name", "m"])
    assert result.exit_code == 1
    assert "is not served: engine/model.onnx has changed since it was built" in result.output
    assert "Rebuild it" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "repo").exists()
