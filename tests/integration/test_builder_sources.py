"""Sources other than file://, concurrency and interruption of the builder, on a tiny random model.

hf:// runs offline against a filled HF cache (and against an unreachable endpoint); s3:// runs against
moto's S3-compatible server on loopback through the real boto3 client (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepseek_builder.cli import build
from deepseek_builder.tiny import write_tiny_model

pytestmark = [pytest.mark.slow]

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def tiny(ws) -> Path:
    return write_tiny_model(ws / "tiny-llama", arch="llama", seed=4)


def cli(source: str, out: Path, cache: Path, *extra: str):
    return CliRunner().invoke(build, ["--source", source, "--backend", "onnxruntime", "--precision", "fp32",
                                      "--max-batch-size", "2", "--max-seq-len", "32", "--output", str(out),
                                      "--cache-dir", str(cache), *extra])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ hf://
def fill_hf_cache(hub: Path, repo: str, files: Path, sha: str = SHA) -> None:
    """The layout huggingface_hub itself writes: blobs linked from snapshots/<commit>, refs/main -> commit."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        shutil.copyfile(f, snapshot / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)


def test_hf_source_offline_builds_from_the_hf_cache_and_records_the_commit(ws, tiny, monkeypatch):
    cache = ws / "cache-hf"
    fill_hf_cache(cache / "downloads" / "hf", "deepseek-ai/tiny-test", tiny)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("hf://deepseek-ai/tiny-test", ws / "out-hf", cache)
    assert result.exit_code == 0, result.output
    report = json.loads((ws / "out-hf" / "build-report.json").read_text())
    assert report["source_revision"] == SHA and report["source_digest"] == f"hf:deepseek-ai/tiny-test@{SHA}"
    missing = cli("hf://deepseek-ai/not-there", ws / "out-hf2", cache)
    assert missing.exit_code == 1 and "HF_HUB_OFFLINE is set" in missing.output


def test_unreachable_hub_is_a_clear_error(ws, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    result = cli("hf://deepseek-ai/DeepSeek-V3", ws / "out-nohub", ws / "cache-nohub")
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ s3://
@pytest.fixture(scope="module")
def s3_endpoint(ws):
    pytest.importorskip("moto", reason="moto[server] provides the loopback S3-compatible server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


def test_s3_source_downloads_once_and_is_keyed_by_etags(ws, tiny, s3_env):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="models")
    for f in tiny.iterdir():
        s3.upload_file(str(f), "models", f"tiny/llama/{f.name}")
    cache = ws / "cache-s3"
    first = cli("s3://models/tiny/llama", ws / "out-s3", cache)
    assert first.exit_code == 0, first.output
    report = json.loads((ws / "out-s3" / "build-report.json").read_text())
    assert report["source_revision"].startswith("etags:")
    assert report["sizes"]["source_bytes"] == sum(f.stat().st_size for f in tiny.iterdir())
    again = cli("s3://models/tiny/llama", ws / "out-s3b", cache)
    assert again.exit_code == 0 and "reused" in again.output and "download: started" not in again.output
    # A changed object changes the ETag, so the content key, so the engine.
    s3.put_object(Bucket="models", Key="tiny/llama/README.md", Body=b"changed")
    changed = cli("s3://models/tiny/llama", ws / "out-s3c", cache)
    assert changed.exit_code == 0 and "download: started" in changed.output
    assert json.loads((ws / "out-s3c" / "build-report.json").read_text())["content_key"] != report["content_key"]


def test_s3_context_beyond_the_model_is_refused_before_the_weights_move(ws, tiny, s3_env):
    """Only config.json is read (one GET): the refusal names both numbers and nothing is downloaded."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="ctx")
    for f in tiny.iterdir():
        s3.upload_file(str(f), "ctx", f"tiny/{f.name}")
    limit = json.loads((tiny / "config.json").read_text())["max_position_embeddings"]
    cache = ws / "cache-s3ctx"
    result = CliRunner().invoke(build, ["--source", "s3://ctx/tiny", "--backend", "onnxruntime", "--precision", "fp32",
                                        "--max-batch-size", "2", "--max-seq-len", str(limit * 2), "--output",
                                        str(ws / "out-s3ctx"), "--cache-dir", str(cache)])
    assert result.exit_code == 1
    assert f"--max-seq-len) {limit * 2} is above the model's max_position_embeddings {limit}" in result.output
    assert not (cache / "downloads" / "s3").exists() and not list((cache / "engines").iterdir())


def test_empty_s3_prefix_is_a_clear_error(ws, s3_env):
    import boto3

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="empty")
    result = cli("s3://empty/nothing", ws / "out-s3e", ws / "cache-s3e")
    assert result.exit_code == 1 and "no objects under this prefix" in result.output


# ------------------------------------------------------------------ concurrency and interruption
def cli_process(source: Path, out: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "deepseek-operator"), "build", "--source", f"file://{source}", "--backend",
         "onnxruntime", "--precision", "fp32", "--max-batch-size", "2", "--max-seq-len", "32", "--output",
         str(out), "--cache-dir", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_killed_build_leaves_no_entry_and_the_next_build_succeeds(ws, tiny):
    cache = ws / "cache-kill"
    proc = cli_process(tiny, ws / "out-kill", cache)
    for line in proc.stdout:
        if "export: started" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list((cache / "engines").iterdir())
    assert not list((cache / "refs").iterdir())
    result = cli(f"file://{tiny}", ws / "out-kill2", cache)
    assert result.exit_code == 0 and "export: started" in result.output


def test_two_builders_of_one_key_build_once(ws, tiny):
    cache = ws / "cache-race"
    a = cli_process(tiny, ws / "out-a", cache)
    b = cli_process(tiny, ws / "out-b", cache)
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b
    (entry,) = list((cache / "engines").iterdir())
    assert (out_a + out_b).count("export: started") == 1
    assert "waiting for it" in out_a + out_b
    for out in ("out-a", "out-b"):
        assert json.loads((ws / out / "build-report.json").read_text())["content_key"] == entry.name
    assert not list((cache / "tmp").iterdir())


def test_terminated_build_cleans_its_scratch_and_says_so(ws, tiny):
    """A deleted build Job's pod gets SIGTERM: the builder removes its scratch folder and exits non-zero."""
    cache = ws / "cache-term"
    proc = cli_process(tiny, ws / "out-term", cache)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "export: started" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "interrupted; nothing was added to the cache" in rest and "Traceback" not in rest
    assert not list((cache / "engines").iterdir()) and not list((cache / "tmp").iterdir())
