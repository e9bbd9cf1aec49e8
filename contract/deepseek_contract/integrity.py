"""Content hashes of an engine directory: recorded by the builder, checked before every reuse.

The builder writes ``manifest.json`` (size and sha256 of every file of the entry) as the last file of a
finished build, before the entry is renamed into place.  Whoever reuses an entry (the builder on a cache
hit, the local mode through it, the Triton pods' init container) calls :func:`verify_entry` first: a
damaged, truncated or partial entry, or one built before manifests existed, is never served.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from .layout import ENTRY_MARKERS, MANIFEST, MODEL_INFO

MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entry_files(entry: Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(entry):
        dirs.sort()
        for name in sorted(names):
            rel = (Path(root) / name).relative_to(entry).as_posix()
            if rel != MANIFEST:
                files.append(rel)
    return files


def write_manifest(entry: Path) -> Path:
    """Record size and sha256 of every file of ``entry`` (a staged build, not yet renamed into place).

    Each file is flushed to disk first, so an entry that survives a crash holds what its manifest says.
    """
    entry = Path(entry)
    files = {}
    for rel in _entry_files(entry):
        path = entry / rel
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path}: an engine directory holds regular files only")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    target = entry / MANIFEST
    tmp = entry / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def verify_entry(entry: Path) -> Optional[str]:
    """None when ``entry`` holds exactly the bytes its manifest recorded, else why it must not be used."""
    entry = Path(entry)
    if not entry.is_dir():
        return f"{entry} does not exist"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except FileNotFoundError:
        return (f"it has no {MANIFEST}: it was built before engines recorded content hashes (or its build did not "
                "finish), so it cannot be verified")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({exc})"
    required = set(ENTRY_MARKERS)
    try:
        required.add(json.loads((entry / MODEL_INFO).read_text())["engine_file"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a missing or changed model-info.json is reported below
    missing = sorted(required - set(files))
    if missing:
        return f"its {MANIFEST} does not cover {', '.join(missing)}"
    # Sizes first: a truncated or missing file is found without reading anything.
    for rel, want in sorted(files.items()):
        path = entry / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("size"):
            return f"{rel} is {size} bytes, {want.get('size')} when it was built (truncated or overwritten)"
    for rel, want in sorted(files.items()):
        try:
            digest = _sha256(entry / rel)
        except OSError as exc:
            return f"{rel} cannot be read ({exc.strerror})"
        if digest != want.get("sha256"):
            return f"{rel} has changed since it was built (sha256 {digest[:12]}..., recorded {str(want.get('sha256'))[:12]}...)"
    return None
