"""The engine cache (layout in model_repository/ENGINE_FORMAT.md).

An entry ``engines/<content key>/`` appears only by renaming a finished build from
``tmp/<unique>/``, after its ``manifest.json`` (size and sha256 of every file) is written.
Every reuse checks the entry against its manifest first: a damaged, partial or pre-manifest
entry is discarded and rebuilt, never served.  Two builders of one key: the first to rename
wins, the other discards its copy.  A per-key lock makes the second wait for the first
instead of building the same engine twice when both run on one node.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from deepseek_contract.integrity import verify_entry, write_manifest
from deepseek_contract.layout import CACHE_ENV, SUBDIRS, CacheLayout, default_cache_dir

from .errors import BuildError

__all__ = ["CACHE_ENV", "EngineCache", "default_cache_dir"]
#: Leftovers of interrupted builds older than this are removed by the next build.
STALE_TMP_SECONDS = 24 * 3600


class EngineCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.layout = CacheLayout(self.root)
        for sub in SUBDIRS:
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BuildError(f"cache directory {self.root} is not writable ({exc.strerror}); pass --cache-dir or "
                                 f"set {CACHE_ENV}") from None

    def entry(self, content_key: str) -> Path:
        return self.layout.entry(content_key)

    def ref_path(self, spec_key: str) -> Path:
        return self.layout.ref(spec_key)

    def inspect(self, content_key: str) -> tuple[Optional[Path], Optional[str]]:
        """(entry, None) when the entry holds what its manifest recorded; (None, why) when it exists but must
        not be used (damaged, partial, or built before manifests); (None, None) when there is none."""
        entry = self.entry(content_key)
        if not entry.exists():
            return None, None
        problem = verify_entry(entry)
        return (None, problem) if problem else (entry, None)

    def finished(self, content_key: str) -> Optional[Path]:
        """The entry when it exists and passes its check against the manifest."""
        return self.inspect(content_key)[0]

    def discard(self, content_key: str) -> None:
        """Take a damaged entry out of ``engines/`` at once (one rename), then delete it."""
        entry = self.entry(content_key)
        trash = self.root / "tmp" / f"{uuid.uuid4().hex}.{os.getpid()}.discarded"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def new_workdir(self) -> Path:
        self._clean_stale_tmp()
        work = self.root / "tmp" / f"{uuid.uuid4().hex}.{os.getpid()}"
        work.mkdir(parents=True)
        return work

    def _clean_stale_tmp(self) -> None:
        now = time.time()
        for p in (self.root / "tmp").iterdir():
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    def publish(self, staged: Path, content_key: str) -> tuple[Path, bool]:
        """Record the content hashes of ``staged``, rename it into place; returns (entry, True), or
        (entry, False) when another build won."""
        write_manifest(staged)
        entry = self.entry(content_key)
        try:
            os.rename(staged, entry)
            return entry, True
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and self.finished(content_key):
                shutil.rmtree(staged, ignore_errors=True)
                return entry, False
            raise

    def write_ref(self, spec_key: str, ref: dict) -> Path:
        path = self.ref_path(spec_key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:  # written after the entry, so a ref always names a finished engine
            f.write(json.dumps(ref, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @contextmanager
    def lock(self, content_key: str, on_wait=None) -> Iterator[None]:
        """Hold an exclusive lock on the key (waits while another builder on this filesystem holds it)."""
        path = self.layout.lock(content_key)
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if on_wait:
                    on_wait()
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
