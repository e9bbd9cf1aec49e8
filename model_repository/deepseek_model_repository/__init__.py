"""Triton model repositories for built engines: config.pbtxt as data, and the Python models that serve text."""

from .repository import ModelNames, RepositoryError, read_model_info, render_configs, resolve_engine_ref, write_repository

__all__ = [
    "ModelNames",
    "RepositoryError",
    "read_model_info",
    "render_configs",
    "resolve_engine_ref",
    "write_repository",
]
