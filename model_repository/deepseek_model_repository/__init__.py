"""Triton model repositories for built engines: config.pbtxt as data, and the Python models that serve text.

The names below come from :mod:`.repository` when first used, so the commands a Triton pod runs beside the server
(its liveness probe every 10 s, the watch around tritonserver for the pod's life) import neither tritonclient nor
protobuf."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ModelNames",
    "RepositoryError",
    "read_model_info",
    "render_configs",
    "resolve_engine_ref",
    "write_repository",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import repository

        return getattr(repository, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
