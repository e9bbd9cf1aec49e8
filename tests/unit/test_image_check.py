"""The serving image's last build step: both of its TensorRTs must be the pinned one (``image_check``).

The version reading runs against real shared libraries built here with the C compiler: a library that exports
TensorRT's version functions, and a backend library that links it, as Triton's tensorrt backend links libnvinfer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_contract.versions import TENSORRT_VERSION
from deepseek_model_repository import image_check
from deepseek_model_repository.image_check import (ImageError, library_version, linked_library, same_release,
                                                   version_triple)


def test_versions_compare_by_release_and_build():
    assert version_triple("10.11.0.33") == (10, 11, 0) and version_triple("10.11.0") == (10, 11, 0)
    assert library_version(101100) == (10, 11, 0) and library_version(100700) == (10, 7, 0)
    assert same_release("10.11.0.33", "10.11.0.33") and same_release("10.11.0", "10.11.0.33")
    assert not same_release("10.11.0.34", "10.11.0.33") and not same_release("10.10.0.31", "10.11.0.33")
    with pytest.raises(ValueError, match="not a TensorRT version"):
        version_triple("ten")


def test_the_linked_library_is_the_one_the_dynamic_linker_resolves():
    python = Path(sys.executable).resolve()
    libc = linked_library(python, "libc.so")
    assert libc.is_file() and libc.name.startswith("libc.so")
    with pytest.raises(ImageError, match="does not link libnvinfer.so"):
        linked_library(python, "libnvinfer.so")
    with pytest.raises(ImageError, match="is not in this image: is its base image Triton's"):
        linked_library(Path("/nonexistent/libtriton_tensorrt.so"), "libnvinfer.so")


def _compile(tmp_path: Path, version: int, build: int) -> tuple[Path, Path]:
    """(a backend library, the folder of the libnvinfer.so.10 it links, which reports ``version`` and ``build``)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the test's shared libraries")
    libs = tmp_path / "lib"
    libs.mkdir()
    nvinfer = tmp_path / "nvinfer.c"
    nvinfer.write_text(f"int getInferLibVersion(void) {{ return {version}; }}\n"
                       f"int getInferLibBuildVersion(void) {{ return {build}; }}\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libnvinfer.so.10", "-o", libs / "libnvinfer.so.10",
                    nvinfer], check=True)
    (libs / "libnvinfer.so").symlink_to("libnvinfer.so.10")
    backend_source = tmp_path / "backend.c"
    backend_source.write_text("int getInferLibVersion(void);\nint backend(void) { return getInferLibVersion(); }\n")
    backend = tmp_path / "libtriton_tensorrt.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", backend, backend_source, f"-L{libs}", "-lnvinfer",
                    "-Wl,--no-as-needed"], check=True)
    return backend, libs


def _run(backend: Path, libs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
    return subprocess.run([sys.executable, "-m", "deepseek_model_repository.image_check", f"--backend={backend}"],
                          capture_output=True, text=True, env=env, timeout=60)


def _backend_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "tensorrt backend" in line]


def test_a_backend_that_links_the_pinned_tensorrt_passes(tmp_path):
    major, minor, patch = version_triple(TENSORRT_VERSION)
    backend, libs = _compile(tmp_path, major * 10000 + minor * 100 + patch, int(TENSORRT_VERSION.split(".")[3]))
    assert image_check.libnvinfer_version(libs / "libnvinfer.so.10") == TENSORRT_VERSION
    checked = _run(backend, libs)
    assert _backend_lines(checked.stderr) == [], checked.stderr


def test_a_backend_that_links_another_tensorrt_fails_saying_what_to_change(tmp_path):
    backend, libs = _compile(tmp_path, 101000, 31)  # 10.10.0.31: the same release's trtllm image
    checked = _run(backend, libs)
    assert checked.returncode == 1
    [line] = _backend_lines(checked.stderr)
    assert f"{libs}/libnvinfer.so.10 is TensorRT 10.10.0.31, but engines are built with TensorRT " \
           f"{TENSORRT_VERSION}" in line
    assert "change TRITON_RELEASE and TENSORRT_VERSION there, in Dockerfile.triton and in Dockerfile.builder" in line


def test_an_unresolved_libnvinfer_fails(tmp_path):
    backend, libs = _compile(tmp_path, 101100, 33)
    shutil.rmtree(libs)
    [line] = _backend_lines(_run(backend, libs).stderr)
    assert "links libnvinfer.so.10, which the dynamic linker does not find here" in line
