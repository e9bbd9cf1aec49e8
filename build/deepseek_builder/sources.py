"""Where checkpoints come from: hf://, s3://, pvc:// and file:// URIs.

Each source is resolved in two steps, so the cache can be consulted before anything big moves:
``resolve`` finds the exact content (an hf commit, S3 ETags, file hashes) and gives a digest;
``fetch`` then makes the files available as a local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from .errors import BuildError

#: Where pvc:// claims are mounted inside the build Job: <root>/<claim>/<path>.
PVC_ROOT_ENV = "DEEPSEEK_OPERATOR_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
SCHEMES = ("hf", "s3", "pvc", "file")
_HASH_CHUNK = 8 << 20
#: Bounds on a local folder, checked before anything in it is hashed.  DeepSeek-V3's checkpoint is 163
#: safetensors files and about 690 GB; a folder far beyond these is not one checkpoint.
MAX_FOLDER_FILES = 10_000
MAX_FOLDER_BYTES = 4 << 40
#: Called with a checkpoint's config.json as soon as it is known (before hashing or downloading).
ConfigCheck = Callable[[dict], None]


@dataclass
class ResolvedSource:
    """A source pinned to exact content."""

    uri: str
    scheme: str
    #: The exact revision: an hf commit sha, or the content digest for the other schemes.
    revision: str
    #: What goes into the content key.
    digest: str
    #: A local folder with the files once fetched (set at once for file:// and pvc://).
    local_dir: Optional[Path] = None
    size_bytes: int = 0
    details: dict = field(default_factory=dict)
    #: The checkpoint's config.json, once read (local folders: at resolve; hf/s3: by fetch_config).
    config: Optional[dict] = None


def scheme_of(uri: str) -> str:
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES:
        raise BuildError(f"{uri}: unsupported source; use hf://org/name, s3://bucket/prefix, pvc://claim/path or "
                         "file:///absolute/path")
    return scheme


def local_path_of(uri: str) -> Path:
    """The folder a file:// or pvc:// URI names on this machine."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
        return path.expanduser()
    claim, rel = parsed.netloc, parsed.path.lstrip("/")
    if not claim:
        raise BuildError(f"{uri}: a pvc:// source needs a claim name: pvc://<claim>/<path>")
    root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
    return root / claim / rel


# ------------------------------------------------------------------ local folders
class FileHashCache:
    """sha256 of files, remembered by (path, size, mtime) so re-hashing a big checkpoint is instant."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.entries: dict[str, list] = {}
        self.lock = threading.Lock()
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self.lock:
            self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # only a speed-up


def folder_files(folder: Path) -> list[Path]:
    """The regular files of a checkpoint folder, sorted, without VCS and cache folders."""
    skip = {".git", ".cache", "__pycache__"}
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in names:
            p = Path(root) / name
            if p.is_file():
                files.append(p)
    return sorted(files)


def folder_digest(folder: Path, hashes: FileHashCache) -> tuple[str, int]:
    """sha256 over (relative name, size, content hash) of every file; also the total size."""
    h = hashlib.sha256()
    total = 0
    for file in folder_files(folder):
        size = file.stat().st_size
        total += size
        h.update(f"{file.relative_to(folder).as_posix()}\0{size}\0{hashes.sha256(file)}\n".encode())
    return h.hexdigest(), total


def check_local_folder(uri: str, folder: Path, role: str = "model") -> Optional[dict]:
    """What can be checked without reading the weights: config.json and its architecture (or an adapter's
    adapter_config.json), safetensors weights present, and a file count and total size that fit one checkpoint.
    Returns the model's config.  Costs a directory walk, bounded by ``MAX_FOLDER_FILES``."""
    from . import architectures as arch

    config = None
    if role == "adapter":
        arch.adapter_config(folder)
    else:
        config = arch.read_config(folder)
        arch.check_architecture(config, folder)
        arch.weight_files(folder)
    skip = {".git", ".cache", "__pycache__"}
    count, total = 0, 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            count += 1
            if count > MAX_FOLDER_FILES:
                raise BuildError(f"{uri}: {folder} holds more than {MAX_FOLDER_FILES} files, far more than one "
                                 "checkpoint; point at the folder that holds config.json, the tokenizer and the "
                                 "*.safetensors weights")
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # a dangling link: folder_files skips it too
    if total > MAX_FOLDER_BYTES:
        raise BuildError(f"{uri}: {folder} holds {total / 2**40:.1f} TiB, more than the {MAX_FOLDER_BYTES >> 40} TiB "
                         "bound on one checkpoint; point at the checkpoint's own folder")
    return config


def resolve_local(uri: str, hashes: FileHashCache, role: str = "model",
                  on_config: Optional[ConfigCheck] = None) -> ResolvedSource:
    scheme = scheme_of(uri)
    folder = local_path_of(uri)
    if not folder.exists():
        hint = f" (pvc:// paths are read under ${PVC_ROOT_ENV}, default {DEFAULT_PVC_ROOT})" if scheme == "pvc" else ""
        raise BuildError(f"{uri}: {folder} does not exist{hint}")
    if not folder.is_dir():
        raise BuildError(f"{uri}: {folder} is not a folder; point at the checkpoint's folder (with config.json)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise BuildError(f"{uri}: {folder} is not readable by this user (uid {os.getuid()})")
    try:
        config = check_local_folder(uri, folder, role)
        if config is not None and on_config is not None:
            on_config(config)
        digest, size = folder_digest(folder, hashes)
    except PermissionError as exc:
        raise BuildError(f"{uri}: cannot read {exc.filename}: permission denied") from None
    return ResolvedSource(uri, scheme, revision=f"sha256:{digest}", digest=f"sha256:{digest}", local_dir=folder,
                          size_bytes=size, config=config)


# ------------------------------------------------------------------ hf://
def _hf_repo(uri: str) -> str:
    parsed = urlparse(uri)
    repo = (parsed.netloc + parsed.path).strip("/")
    if repo.count("/") != 1:
        raise BuildError(f"{uri}: an hf:// source is hf://<org>/<name>")
    return repo


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_hf(uri: str, revision: Optional[str], download_dir: Optional[Path] = None) -> ResolvedSource:
    """The commit a branch/tag points at (HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured).

    Offline, the snapshot comes from the builder's download folder or else the default HF cache
    (HF_HUB_CACHE / HF_HOME), exactly as a previous online build or `hf download` left it.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo = _hf_repo(uri)
    if _hf_offline():
        # Offline: the local snapshot of that revision is the content; its folder name is the commit.
        caches = ([str(download_dir / "hf")] if download_dir else []) + [os.environ.get("HF_HUB_CACHE")]
        for cache_dir in caches:
            try:
                path = Path(snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=cache_dir))
            except Exception:  # noqa: BLE001 - huggingface_hub raises several unrelated types here
                continue
            return ResolvedSource(uri, "hf", revision=path.name, digest=f"hf:{repo}@{path.name}", local_dir=path,
                                  details={"repo": repo})
        raise BuildError(f"{uri}: HF_HUB_OFFLINE is set and no local copy of revision {revision or 'main'} exists "
                         "in the builder's download cache or HF_HUB_CACHE; download it first or unset HF_HUB_OFFLINE")
    try:
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo, revision=revision)
    except RepositoryNotFoundError:
        raise BuildError(f"{uri}: no such model on {os.environ.get('HF_ENDPOINT', 'huggingface.co')}, or it is "
                         "private/gated and HF_TOKEN is missing or lacks access") from None
    except RevisionNotFoundError:
        raise BuildError(f"{uri}: revision {revision!r} does not exist") from None
    except HfHubHTTPError as exc:
        raise BuildError(f"{uri}: the Hub answered an error ({exc}); check HF_TOKEN and HF_ENDPOINT") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come from the HTTP library huggingface_hub uses
        where = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise BuildError(f"{uri}: cannot reach {where} ({type(exc).__name__}: {exc}); set HF_ENDPOINT for a mirror, "
                         "or HF_HUB_OFFLINE=1 with the model in the HF cache") from None
    size = sum((s.size or 0) for s in (info.siblings or []))
    return ResolvedSource(uri, "hf", revision=info.sha, digest=f"hf:{repo}@{info.sha}", size_bytes=size,
                          details={"repo": repo})


def fetch_hf(source: ResolvedSource, download_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    if source.local_dir is not None:
        return source.local_dir
    try:
        path = snapshot_download(
            source.details["repo"], revision=source.revision, cache_dir=str(download_dir / "hf"),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"],
        )
    except Exception as exc:  # noqa: BLE001
        raise BuildError(f"{source.uri}: download failed: {type(exc).__name__}: {exc}") from None
    return Path(path)


# ------------------------------------------------------------------ s3://
def _s3_client():
    try:
        import boto3
    except ImportError:
        raise BuildError("s3:// sources need boto3: pip install 'deepseek-operator[builder]'") from None
    # boto3 reads AWS_ENDPOINT_URL (S3-compatible stores), AWS_REGION and credentials from the environment itself.
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _s3_objects(uri: str) -> tuple[str, str, list[dict]]:
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise BuildError(f"{uri}: an s3:// source is s3://<bucket>/<prefix>")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = _s3_client()
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects += page.get("Contents", [])
    except Exception as exc:  # noqa: BLE001 - botocore's error classes are generated at runtime
        raise BuildError(f"{uri}: cannot list the bucket ({exc}); check AWS credentials and AWS_ENDPOINT_URL") from None
    if not objects:
        raise BuildError(f"{uri}: no objects under this prefix")
    return bucket, prefix, sorted(objects, key=lambda o: o["Key"])


def resolve_s3(uri: str) -> ResolvedSource:
    bucket, prefix, objects = _s3_objects(uri)
    h = hashlib.sha256()
    for o in objects:
        h.update(f"{o['Key'][len(prefix):]}\0{o['Size']}\0{o['ETag']}\n".encode())
    digest = h.hexdigest()
    return ResolvedSource(uri, "s3", revision=f"etags:{digest}", digest=f"s3:{digest}",
                          size_bytes=sum(o["Size"] for o in objects),
                          details={"bucket": bucket, "prefix": prefix, "keys": [o["Key"] for o in objects]})


def fetch_s3(source: ResolvedSource, download_dir: Path, log: Callable[[str], None]) -> Path:
    target = download_dir / "s3" / source.digest.split(":", 1)[1][:20]
    done = target / ".complete"
    if done.exists():
        return target
    client = _s3_client()
    bucket, prefix = source.details["bucket"], source.details["prefix"]
    for key in source.details["keys"]:
        rel = key[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        log(f"s3://{bucket}/{key}")
        try:
            client.download_file(bucket, key, str(dest))
        except Exception as exc:  # noqa: BLE001
            raise BuildError(f"{source.uri}: download of {key} failed: {exc}") from None
    done.write_text("")
    return target


def fetch_config(source: ResolvedSource, download_dir: Path) -> dict:
    """config.json alone, before the weights: hf:// into the same cache the snapshot uses, s3:// by one GET."""
    from . import architectures as arch

    if source.config is not None:
        return source.config
    if source.local_dir is not None:
        source.config = arch.read_config(source.local_dir)
        return source.config
    if source.scheme == "hf":
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source.details["repo"], "config.json", revision=source.revision,
                                   cache_dir=str(download_dir / "hf"), endpoint=os.environ.get("HF_ENDPOINT") or None)
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several unrelated types here
            raise BuildError(f"{source.uri}: cannot fetch config.json ({type(exc).__name__}: {exc}); is it a "
                             "Hugging Face checkpoint?") from None
        source.config = arch.read_config(Path(path).parent)
        return source.config
    bucket, prefix = source.details["bucket"], source.details["prefix"]
    if f"{prefix}config.json" not in source.details["keys"]:
        raise BuildError(f"{source.uri}: no config.json under this prefix; is it a Hugging Face checkpoint?")
    try:
        body = _s3_client().get_object(Bucket=bucket, Key=f"{prefix}config.json")["Body"].read()
        source.config = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BuildError(f"{source.uri}: config.json is not valid JSON ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - botocore's error classes are generated at runtime
        raise BuildError(f"{source.uri}: cannot read config.json ({exc}); check AWS credentials") from None
    return source.config


# ------------------------------------------------------------------ entry points
def resolve(uri: str, revision: Optional[str], hashes: FileHashCache,
            download_dir: Optional[Path] = None, *, role: str = "model",
            on_config: Optional[ConfigCheck] = None) -> ResolvedSource:
    """Pin ``uri``.  A local folder is checked (``check_local_folder``, then ``on_config``) before it is hashed."""
    scheme = scheme_of(uri)
    if scheme == "hf":
        return resolve_hf(uri, revision, download_dir)
    if scheme == "s3":
        return resolve_s3(uri)
    return resolve_local(uri, hashes, role, on_config)


def fetch(source: ResolvedSource, download_dir: Path, log: Callable[[str], None]) -> Path:
    if source.scheme == "hf":
        return fetch_hf(source, download_dir)
    if source.scheme == "s3":
        return fetch_s3(source, download_dir, log)
    assert source.local_dir is not None
    return source.local_dir
