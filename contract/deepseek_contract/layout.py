"""The engine cache's layout (model_repository/ENGINE_FORMAT.md describes it for people).

```
<cache>/engines/<content key>/   a finished engine directory (appears only by an atomic rename)
<cache>/refs/<spec key>.json     {"content_key": ..., "engine_dir": "engines/<content key>", ...}
<cache>/tmp/                     builds in progress
<cache>/timing/                  TensorRT timing caches
<cache>/locks/                   per-key build locks
<cache>/downloads/               fetched sources
<cache>/local/                   the local mode's state
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Union

#: Environment variable that overrides the default cache directory.
CACHE_ENV = "DEEPSEEK_OPERATOR_CACHE"

# File and folder names inside one engine directory.
MODEL_INFO = "model-info.json"
BUILD_REPORT = "build-report.json"
TOKENIZER_DIR = "tokenizer"
#: The engine file of each backend, relative to the engine directory.
ENGINE_FILES = {"onnxruntime": "engine/model.onnx", "tensorrt": "engine/model.plan"}
#: The files a finished entry always has.
ENTRY_MARKERS = (MODEL_INFO, BUILD_REPORT)
#: Size and sha256 of every other file of the entry, written last (deepseek_contract.integrity).
MANIFEST = "manifest.json"

SUBDIRS = ("engines", "refs", "tmp", "timing", "locks", "downloads")


def default_cache_dir(explicit: Optional[Union[str, Path]] = None) -> Path:
    """``explicit``, else ``$DEEPSEEK_OPERATOR_CACHE``, else ``$XDG_CACHE_HOME/deepseek-operator``
    (``~/.cache/deepseek-operator``)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepseek-operator"


@dataclass(frozen=True)
class CacheLayout:
    """Paths inside one cache root (a local folder, or the cache volume's mount point in a pod)."""

    root: PurePosixPath | Path

    def entry(self, content_key: str):
        return self.root / "engines" / content_key

    def entry_relative(self, content_key: str) -> str:
        """The entry as a ref records it: relative to the cache root."""
        return f"engines/{content_key}"

    def ref(self, spec_key: str):
        return self.root / "refs" / f"{spec_key}.json"

    def lock(self, content_key: str):
        return self.root / "locks" / f"{content_key}.lock"

    def local_state(self):
        return self.root / "local"
