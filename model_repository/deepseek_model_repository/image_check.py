"""Does this serving image run the engines the builder makes?  Run as the serving image's last build step.

A TensorRT engine loads only under the TensorRT that built it (``deepseek_contract.versions.TENSORRT_VERSION``,
the builder image's).  The serving image runs engines under two TensorRTs: the scheduler model's through the pip
``tensorrt`` package it installs, and the classification and embedding models' through Triton's ``tensorrt_plan``
backend, which links the image's own ``libnvinfer``.  Both must be the pinned version::

    python3 -m deepseek_model_repository.image_check

Exit status 0 when both are; 1, saying which is not and what to change, otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from deepseek_contract.versions import TENSORRT_VERSION, TRITON_RELEASE

#: Triton's TensorRT backend in its images (``/opt/tritonserver/backends/<backend>/libtriton_<backend>.so``).
TENSORRT_BACKEND = Path("/opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so")
LIBNVINFER = "libnvinfer.so"

_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(not found|\S+)")


class ImageError(Exception):
    """What is wrong with the image, and what to change."""


def linked_library(binary: Path, soname_prefix: str) -> Path:
    """The file that ``binary`` loads for the library whose name starts with ``soname_prefix``, as the dynamic
    linker resolves it in this environment (``ldd``)."""
    if not binary.is_file():
        raise ImageError(f"{binary} is not in this image: is its base image Triton's (nvcr.io/nvidia/tritonserver)?")
    listed = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        raise ImageError(f"ldd {binary} failed: {(listed.stderr or listed.stdout).strip()}")
    for line in listed.stdout.splitlines():
        found = _LDD_LINE.match(line)
        if found and found.group(1).startswith(soname_prefix):
            if found.group(2) == "not found":
                raise ImageError(f"{binary} links {found.group(1)}, which the dynamic linker does not find here")
            return Path(found.group(2))
    raise ImageError(f"{binary} does not link {soname_prefix}*")


def version_triple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a TensorRT version such as ``10.11.0.33``."""
    found = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.\d+)?", version)
    if not found:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


def library_version(number: int) -> tuple[int, int, int]:
    """(major, minor, patch) from ``getInferLibVersion()``: major * 10000 + minor * 100 + patch since TensorRT 10."""
    return number // 10000, number // 100 % 100, number % 100


def libnvinfer_version(library: Path) -> str:
    """The version that ``library`` (a ``libnvinfer``) reports: ``major.minor.patch``, and ``.build`` where it
    exports ``getInferLibBuildVersion``."""
    lib = ctypes.CDLL(str(library))
    lib.getInferLibVersion.restype = ctypes.c_int32
    version = ".".join(map(str, library_version(lib.getInferLibVersion())))
    if hasattr(lib, "getInferLibBuildVersion"):
        lib.getInferLibBuildVersion.restype = ctypes.c_int32
        version += f".{lib.getInferLibBuildVersion()}"
    return version


def same_release(found: str, pinned: str = TENSORRT_VERSION) -> bool:
    """Whether TensorRT ``found`` runs engines built by ``pinned``: the same major, minor and patch, and the same build
    where ``found`` names one."""
    if version_triple(found) != version_triple(pinned):
        return False
    return found.count(".") < 3 or pinned.count(".") < 3 or found == pinned


def _mismatch(where: str, found: str) -> str:
    return (f"{where} is TensorRT {found}, but engines are built with TensorRT {TENSORRT_VERSION} "
            f"(deepseek_contract.versions.TENSORRT_VERSION, for Triton {TRITON_RELEASE}): build this image from the "
            "Triton release whose TensorRT is that version, or change TRITON_RELEASE and TENSORRT_VERSION there, "
            "in Dockerfile.triton and in Dockerfile.builder together")


def check(backend: Path = TENSORRT_BACKEND) -> list[str]:
    """What is wrong with this image (nothing: an empty list)."""
    problems = []
    try:
        import tensorrt

        if not same_release(tensorrt.__version__):
            problems.append(_mismatch("the pip tensorrt package (the scheduler model's TensorRT)", tensorrt.__version__))
    except ImportError as exc:
        problems.append(f"the scheduler model's TensorRT is missing: {exc} (pip install tensorrt-cu12=="
                        f"{TENSORRT_VERSION})")
    try:
        library = linked_library(backend, LIBNVINFER)
        found = libnvinfer_version(library)
        if not same_release(found):
            problems.append(_mismatch(f"Triton's tensorrt backend's {library}", found))
    except (ImageError, OSError, AttributeError) as exc:
        problems.append(f"the TensorRT of Triton's tensorrt backend could not be checked: {exc}")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m deepseek_model_repository.image_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", type=Path, default=TENSORRT_BACKEND, help="Triton's TensorRT backend library")
    args = parser.parse_args(argv)
    problems = check(args.backend)
    for problem in problems:
        print(f"image check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
