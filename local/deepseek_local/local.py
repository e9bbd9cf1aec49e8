"""The local mode: build a DeepSeekModel and serve it on a real Triton Inference Server on this machine.

``deepseek-operator local up`` runs the same build as the cluster (same cache,
same engine directory), writes the model repository with ``runtime="local"``
(the ONNX engine inside a Python-backend model, since the Triton that
``nvidia-pytriton`` bundles has only the Python backend), starts ``tritonserver``
in its own session and returns once the model is ready.  Its pid and ports go to
``<cache>/local/<name>.json``; ``down`` stops it, ``status`` lists what runs,
``generate`` is a tritonclient client.

``up``, ``down`` and ``status`` of one model take ``<cache>/local/<name>.lock`` (flock), so two of
them never act on the same server at once.  tritonserver leads a process group of its own, its Python
backend stubs included, and ``down`` ends the whole group (SIGTERM, then SIGKILL after a grace period).
A server that died leaves state, stubs and ``/dev/shm`` regions (named by a per-server prefix) behind:
the next ``up``, ``down`` or ``status`` cleans them and says so.  tritonserver gets an allow-listed
environment (``server_env``), never the caller's credentials.

The server is started as RECIPES.md measured: the Python backend copied into a
``backends/`` directory with the stub for this Python, the venv's ``bin`` first
on PATH, ``LD_LIBRARY_PATH`` at ``nvidia_pytriton.libs``, loopback addresses and
a short exit timeout.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import click
import yaml

from deepseek_model_repository.config import server_flags
from deepseek_model_repository.repository import ModelNames
from deepseek_model_repository.serving.processes import (LOST_INIT_S, STARVED_ABORT, STARVED_ABORTED, dead_stubs,
                                                         lost_initialization, lost_initializations)

from deepseek_contract.layout import CACHE_ENV as ENV_CACHE
from deepseek_contract.layout import default_cache_dir
from deepseek_operator import api, engine_key

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
READY_TIMEOUT_S = 300.0
#: How many times ``serve_repository`` starts a server whose model process Triton lost.
START_ATTEMPTS = 2
#: --exit-timeout-secs of a server started from a repository alone; `up` gives a CR's serving.drainSeconds.
EXIT_TIMEOUT_S = 5
#: How long the processes of a server whose tritonserver is gone get after SIGTERM before SIGKILL (Python
#: stubs whose server died do not exit on SIGTERM).
ORPHAN_GRACE_S = 2.0
#: The only variables tritonserver and its Python stubs get from the caller's environment: what running
#: needs (paths, locale, temp dir, thread counts, device selection), never credentials (HF_TOKEN, AWS_*).
SERVER_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "PYTHONPATH",
    "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM",
})
SERVER_ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "NUMEXPR_")
#: Python-backend shared memory regions live here, named by the server's --backend-config prefix.
SHM_DIR = Path("/dev/shm")
DEFAULT_EXAMPLE = "local-tiny.yaml"
#: Packaged beside this module (package data).
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
#: Python backend shared memory: logits of a full batch (vocab ~128k x fp32) cross it on every decode step.


class LocalError(click.ClickException):
    """A local-mode failure the user can fix; printed without a traceback, exit status 1."""


# ------------------------------------------------------------------ paths and state
@dataclass
class LocalServer:
    """A running local Triton: what ``status`` and ``down`` need (stored as <cache>/local/<name>.json)."""

    name: str
    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    log: str
    engine_dir: str = ""
    task: str = "text-generation"
    started_at: float = 0.0
    #: The process group tritonserver leads (its pid); the Python stubs are in it too.
    pgid: int = 0
    #: The prefix of the server's Python-backend shared memory regions in /dev/shm.
    shm_prefix: str = ""
    #: Seconds tritonserver drains the requests it holds once told to stop (``--exit-timeout-secs``).
    exit_timeout_s: int = EXIT_TIMEOUT_S

    @property
    def endpoints(self) -> dict[str, str]:
        return {
            "http": f"http://127.0.0.1:{self.http_port}",
            "grpc": f"127.0.0.1:{self.grpc_port}",
            "metrics": f"http://127.0.0.1:{self.metrics_port}/metrics",
        }


def state_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "local"


def command(name: str, filename: Optional[str] = None, cache_dir: Optional[Path] = None) -> str:
    """The ``local`` command a message tells the user to run, with the file and cache it needs (the cache only where
    it is not the default)."""
    words = ["deepseek-operator", "local", name]
    if filename:
        words += ["-f", str(filename)]
    if cache_dir is not None and Path(cache_dir).expanduser().resolve() != default_cache_dir().expanduser().resolve():
        words += ["--cache-dir", str(cache_dir)]
    return "`" + shlex.join(words) + "`"


def others_running(cache_dir: Path, name: str) -> str:
    """For a message that ``name`` is not running: the models whose servers do run in this cache, and how to pick
    one ("" when none does)."""
    others = [path.stem for path in sorted(state_dir(cache_dir).glob("*.json")) if path.stem != name
              and (server := read_state(cache_dir, path.stem)) is not None and server_running(server)]
    if not others:
        return ""
    return f" (running in this cache: {', '.join(others)}; -f names a model's file, the embedded example without it)"


def state_file(cache_dir: Path, name: str) -> Path:
    return state_dir(cache_dir) / f"{name}.json"


@contextmanager
def model_lock(cache_dir: Path, name: str, wait: bool = True,
               on_wait: Optional[Callable[[], None]] = None) -> Iterator[bool]:
    """Hold ``<cache>/local/<name>.lock``; yields False at once, without the lock, if busy and not ``wait``."""
    path = state_dir(cache_dir) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # opened close-on-exec: tritonserver never inherits the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(cache_dir: Path, name: str) -> Optional[LocalServer]:
    path = state_file(cache_dir, name)
    try:
        return LocalServer(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def write_state(cache_dir: Path, server: LocalServer) -> None:
    path = state_file(cache_dir, server.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(server), indent=2))
    tmp.replace(path)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of this process is reaped and counts as gone)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def server_running(server: LocalServer) -> bool:
    """True while the recorded pid is still that tritonserver (a pid reused after a reboot is not ours)."""
    if not pid_alive(server.pid):
        return False
    try:
        with open(f"/proc/{server.pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return any(arg.endswith(b"tritonserver") for arg in argv) and any(
        arg == f"--model-repository={server.repository}".encode() for arg in argv
    )


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, process group) of ``pid`` from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _ours(pid: int) -> bool:
    """A tritonserver or one of its Python-backend stubs (a recycled group id is someone else's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv0 = fh.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return argv0.endswith((b"tritonserver", b"triton_python_backend_stub"))


def group_members(pgid: int) -> list[int]:
    """The live processes of tritonserver's process group (the server and its stubs)."""
    if pgid <= 0 or not os.path.isdir("/proc"):
        return [pgid] if pgid > 0 and pid_alive(pgid) else []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat and stat[1] == pgid and stat[0] != "Z" and _ours(int(entry)):
                members.append(int(entry))
    return members


def stop_group(pgid: int, timeout: float = EXIT_TIMEOUT_S + 15) -> int:
    """SIGTERM the process group, SIGKILL what is left after ``timeout``; returns how many processes it had.

    When the server itself is already dead, only its orphans are left and they get ``ORPHAN_GRACE_S``.
    """
    members = group_members(pgid)
    if not members:
        pid_alive(pgid)  # reap our own zombie child, if it is one
        return 0
    if pgid not in members:
        timeout = min(timeout, ORPHAN_GRACE_S)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pid_alive(pgid)  # reaps the server when this process started it
            if not group_members(pgid):
                return len(members)
            time.sleep(0.1)
    return len(members)


def remove_shm(prefix: str) -> int:
    """Delete the server's Python-backend shared memory regions; returns how many there were."""
    if not prefix or not SHM_DIR.is_dir():
        return 0
    removed = 0
    for region in SHM_DIR.glob(f"{prefix}*"):
        try:
            region.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def end_server(cache_dir: Path, server: LocalServer) -> int:
    """End the server's process group (stubs included), remove its shared memory and state; returns the
    number of processes that were still running. A server whose model process died gets ``ORPHAN_GRACE_S``, not its
    exit timeout: Triton cannot finish the requests that process held, and would wait that whole timeout for them."""
    timeout = server.exit_timeout_s + 15
    if dead_stubs(server.pid):  # Triton would wait its whole exit timeout for the requests a dead process holds
        timeout = ORPHAN_GRACE_S
    ended = stop_group(server.pgid or server.pid, timeout=timeout)
    remove_shm(server.shm_prefix)
    state_file(cache_dir, server.name).unlink(missing_ok=True)
    return ended


# ------------------------------------------------------------------ the Triton binary
@dataclass(frozen=True)
class TritonInstall:
    """Where the server binary, the Python backend and its stub live."""

    binary: Path
    python_backend: Path
    stub: Optional[Path]
    libs: Optional[Path]


def find_triton() -> TritonInstall:
    """The tritonserver bundled in ``nvidia-pytriton``, else ``tritonserver`` from PATH."""
    try:
        import pytriton  # noqa: F401 - located, not used

        root = Path(resources.files("pytriton")) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        libs = Path(resources.files("pytriton")).parent / "nvidia_pytriton.libs"
        if (root / "bin" / "tritonserver").exists():
            if not stub.exists():
                raise LocalError(f"nvidia-pytriton has no Python backend stub for Python {version}")
            return TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python", stub, libs)
    except ImportError:
        pass
    binary = shutil.which("tritonserver")
    if binary:
        backends = Path(binary).resolve().parent.parent / "backends"
        return TritonInstall(Path(binary), backends / "python", None, None)
    raise LocalError(
        "no Triton Inference Server found: install the local extra (pip install 'deepseek-operator[local]', "
        "which bundles tritonserver in nvidia-pytriton) or put tritonserver on PATH"
    )


def prepare_backends(install: TritonInstall, directory: Path) -> Path:
    """A backends/ directory holding the Python backend with the stub for this interpreter."""
    target = directory / "python"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(install.python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
    if install.stub is not None:
        shutil.copy2(install.stub, target / "triton_python_backend_stub")
    return directory


def check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise LocalError(f"port {port} ({what}) is in use on 127.0.0.1: pass --{what}-port with a free port") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(install: TritonInstall) -> dict[str, str]:
    """The allow-listed part of this environment (``SERVER_ENV_NAMES``, ``SERVER_ENV_PREFIXES``: no credentials),
    PATH with this venv's bin first (the stub's packages) and LD_LIBRARY_PATH at the bundled libraries."""
    env = {k: v for k, v in os.environ.items() if k in SERVER_ENV_NAMES or k.startswith(SERVER_ENV_PREFIXES)}
    env["PYTHONUTF8"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if install.libs is not None and install.libs.exists():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.libs), env.get("LD_LIBRARY_PATH")]))
    return env


def server_argv(
    install: TritonInstall, repository: Path, workdir: Path, *, http_port: int, grpc_port: int, metrics_port: int,
    shm_prefix: str = "", exit_timeout_s: int = EXIT_TIMEOUT_S,
) -> list[str]:
    """tritonserver's command line for ``repository`` on loopback, with the Python backend prepared in ``workdir``."""
    backends = prepare_backends(install, workdir / "backends")
    return [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--log-verbose=0",
    ] + server_flags() + ([f"--backend-config=python,shm-region-prefix-name={shm_prefix}"] if shm_prefix else [])


def start_triton(
    repository: Path, workdir: Path, *, http_port: int, grpc_port: int, metrics_port: int, log_path: Path,
    shm_prefix: str = "", exit_timeout_s: int = EXIT_TIMEOUT_S,
) -> int:
    """Start tritonserver in a session and process group of its own (it outlives this command, and its
    Python stubs join its group); return its pid, which is also the group's id."""
    install = find_triton()
    argv = server_argv(install, repository, workdir, http_port=http_port, grpc_port=grpc_port,
                       metrics_port=metrics_port, shm_prefix=shm_prefix, exit_timeout_s=exit_timeout_s)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawn(
            argv[0],
            argv,
            server_env(install),
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)],
            setsid=True,
        )
    finally:
        os.close(fd)
        os.close(devnull)
    return pid


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LostInitialization(LocalError):
    """Triton 2.51 gave up on a model's process during its ``initialize`` (the process missed its one-second health
    check, starved of CPU), yet the process went on and initialized: Triton then waits for it to exit, for ever, and
    the server never starts serving (measured: a stub stopped for 2.5 s in its ``initialize``). Or Triton aborted
    there instead (:data:`STARVED_ABORT`; seen once, in a full run, with the same stopped stub)."""


def wait_ready(pid: int, http_port: int, models: list[str], log_path: Path, timeout: float = READY_TIMEOUT_S,
               lost_after_s: float = LOST_INIT_S) -> None:
    """Poll /v2/models/<m>/ready until every model is ready; fail with the log's tail if the server dies, and with
    ``LostInitialization`` once a model's process has initialized ``lost_after_s`` ago and Triton has not loaded it."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    announced_at: dict[str, float] = {}
    while pending:
        if not pid_alive(pid):
            if STARVED_ABORT in log_tail(log_path):
                raise LostInitialization(f"{STARVED_ABORTED}; log ({log_path}) ends:\n{log_tail(log_path)}")
            raise LocalError(f"tritonserver exited before the model was ready; its log ({log_path}) ends:\n"
                             f"{log_tail(log_path)}")
        try:
            lost = lost_initializations(Path(log_path).read_text(errors="replace"), announced_at, time.monotonic(),
                                        lost_after_s)
        except OSError:
            lost = []
        if lost:
            stop_group(pid, timeout=2.0)  # it serves nothing, and its loading thread never sees a SIGTERM
            raise LostInitialization(f"{lost_initialization(lost[0], lost_after_s)}; log ({log_path}) ends:\n"
                                     f"{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{pending[0]}/ready", timeout=2) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            stop_group(pid)
            raise LocalError(f"model {pending[0]} not ready after {timeout:.0f}s; log ({log_path}) ends:\n"
                             f"{log_tail(log_path)}")
        time.sleep(0.25)


# ------------------------------------------------------------------ the CR and the build
def load_default_resource(cache_dir: Path) -> api.DeepSeekModel:
    """The embedded local-tiny.yaml, its source pointed at a tiny random-weight model made in the cache on first use."""
    raw = yaml.safe_load(EXAMPLES_DIR.joinpath(DEFAULT_EXAMPLE).read_text())
    annotations = raw.get("metadata", {}).get("annotations", {}) or {}
    arch = annotations.get("deepseek.ai/tiny-architecture", "deepseek_v3")
    task = raw["spec"]["model"].get("task", "text-generation")
    model_dir = Path(cache_dir) / "tiny-models" / f"{arch}-{task}"
    ensure_tiny_model(model_dir, arch, task)
    raw["spec"]["model"]["source"] = f"file://{model_dir.resolve()}"
    return api.parse_resource(raw)


def ensure_tiny_model(model_dir: Path, arch: str, task: str) -> None:
    """Write the builder's tiny random-weight model once (config.json marks a finished one)."""
    if (model_dir / "config.json").exists():
        return
    try:
        from deepseek_builder.tiny import write_tiny_model
    except ImportError as exc:
        raise LocalError(f"the builder is not installed ({exc}): pip install 'deepseek-operator[builder,local]'") from None
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_model(tmp, arch=arch, task=task, seed=0)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


def load_resource(path: Optional[str], cache_dir: Path) -> api.DeepSeekModel:
    if path is None:
        return load_default_resource(cache_dir)
    try:
        return api.load_resource_file(path)
    except api.SpecError as exc:
        raise LocalError(str(exc)) from None


def check_runnable(resource: api.DeepSeekModel) -> None:
    """Refuse what this machine cannot serve, before any build."""
    spec = resource.spec
    if spec.engine.backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise LocalError(
                f"{resource.name}: engine.backend is tensorrt, but TensorRT is not installed here (and the local "
                "Triton has no TensorRT backend): set spec.engine.backend: onnxruntime (precision fp32, fp16 or int8) "
                "and serving.gpusPerReplica: 0 to run it locally"
            ) from None
        raise LocalError(
            f"{resource.name}: the local mode serves ONNX Runtime engines only (the Triton bundled with PyTriton has "
            "no TensorRT backend): set spec.engine.backend: onnxruntime"
        )


def build_engine(resource: api.DeepSeekModel, cache_dir: Path, echo: Callable[[str], None]) -> Path:
    """The cluster's build, on this machine: returns the engine directory in the cache (reused when present)."""
    try:
        from deepseek_builder import api as builder
        from deepseek_builder.errors import BuildError
    except ImportError as exc:
        raise LocalError(f"the builder is not installed ({exc}): pip install 'deepseek-operator[builder,local]'") from None
    try:
        request = builder.BuildRequest(inputs=engine_key.inputs_from_spec(resource.spec), cache_dir=Path(cache_dir),
                                       model_name=resource.name, runtime="local")
        result = builder.build(request, log=echo)
    except BuildError as exc:
        raise LocalError(f"build of {resource.name} failed: {exc}") from None
    return Path(result.engine_dir)


# ------------------------------------------------------------------ up / down
def serve_repository(
    name: str,
    repository: Path,
    cache_dir: Path,
    *,
    models: list[str],
    http_port: int = DEFAULT_PORTS["http"],
    grpc_port: int = DEFAULT_PORTS["grpc"],
    metrics_port: int = DEFAULT_PORTS["metrics"],
    engine_dir: str = "",
    task: str = "text-generation",
    exit_timeout_s: int = EXIT_TIMEOUT_S,
    lost_after_s: float = LOST_INIT_S,
) -> LocalServer:
    """Start Triton on an existing repository, wait for ``models``, record the state; ports 0 pick free ones.
    ``exit_timeout_s``: how long it drains the requests it holds when told to stop. Where Triton lost a model's
    process as it initialized (``LostInitialization``, after ``lost_after_s``), it starts the server once more."""
    ports = {}
    for what, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        if port == 0:
            port = free_port()
        check_port_free(port, what)
        ports[what] = port
    workdir = state_dir(cache_dir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "tritonserver.log"
    attempt = 1
    while True:
        shm_prefix = f"deepseek_local_{uuid.uuid4().hex[:12]}_"
        pid = start_triton(
            Path(repository).resolve(), workdir, http_port=ports["http"], grpc_port=ports["grpc"],
            metrics_port=ports["metrics"], log_path=log_path, shm_prefix=shm_prefix, exit_timeout_s=exit_timeout_s,
        )
        server = LocalServer(
            name=name, pid=pid, http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"],
            repository=str(Path(repository).resolve()), log=str(log_path), engine_dir=engine_dir, task=task,
            started_at=time.time(), pgid=pid, shm_prefix=shm_prefix, exit_timeout_s=exit_timeout_s,
        )
        write_state(cache_dir, server)
        try:
            wait_ready(pid, ports["http"], models, log_path, lost_after_s=lost_after_s)
            return server
        except LostInitialization as exc:
            end_server(cache_dir, server)
            if attempt == START_ATTEMPTS:
                raise
            attempt += 1
            click.echo(f"{exc.message.splitlines()[0]}: starting the server again", err=True)
        except BaseException:  # not ready, or Ctrl-C while waiting: leave nothing running or recorded
            end_server(cache_dir, server)
            raise


def up_resource(
    resource: api.DeepSeekModel,
    cache_dir: Path,
    *,
    http_port: int = DEFAULT_PORTS["http"],
    grpc_port: int = DEFAULT_PORTS["grpc"],
    metrics_port: int = DEFAULT_PORTS["metrics"],
    echo: Callable[[str], None] = click.echo,
    filename: Optional[str] = None,
) -> LocalServer:
    """Build (or reuse) the engine, write the repository, start Triton, wait until the model is ready.

    Holds the model's lock throughout, so a concurrent `up` waits and then finds this server running.
    ``filename``: the CR's file, for the commands that messages name."""
    cache_dir = Path(cache_dir)
    check_runnable(resource)
    with model_lock(cache_dir, resource.name, on_wait=lambda: echo(
            f"another `local up` or `down` of {resource.name} is running; waiting for it")):
        running = read_state(cache_dir, resource.name)
        if running and server_running(running):
            raise LocalError(
                f"{resource.name} is already running (pid {running.pid}, HTTP {running.endpoints['http']}, "
                f"gRPC {running.endpoints['grpc']}): run {command('down', filename, cache_dir)} first"
            )
        if running:
            ended = end_server(cache_dir, running)
            echo(f"{resource.name}: the previous server (pid {running.pid}) had died; cleaned its state"
                 + (f" and ended {ended} leftover process(es)" if ended else ""))
        return _up_locked(resource, cache_dir, http_port, grpc_port, metrics_port, echo)


def repository_options(resource: api.DeepSeekModel) -> dict[str, Any]:
    """What the CR's ``spec.serving`` says about the model repository, as ``write_repository`` takes it (the init
    container gets the same from its command line, ``render.repository_command``)."""
    serving = resource.spec.serving
    return {
        "max_queue_delay_us": serving.dynamic_batching.queue_delay_us(resource.spec.model.task),
        "preferred_batch_sizes": serving.dynamic_batching.preferred_batch_sizes,
        "stream_interval": serving.stream_interval,
        "engine_threads": serving.engine_threads,
        "request_timeout_s": serving.request_timeout_seconds,
        "prefill_chunk_tokens": serving.prefill_chunk_tokens,
        "share_prefixes": serving.prefix_sharing,
    }


def _up_locked(resource: api.DeepSeekModel, cache_dir: Path, http_port: int, grpc_port: int, metrics_port: int,
               echo: Callable[[str], None]) -> LocalServer:
    from deepseek_model_repository import RepositoryError, write_repository

    engine_dir = build_engine(resource, cache_dir, echo)
    repo = state_dir(cache_dir) / resource.name / "repository"
    try:
        write_repository(engine_dir, repo, resource.name, runtime="local", **repository_options(resource))
    except RepositoryError as exc:
        raise LocalError(str(exc)) from None
    names = ModelNames.of(resource.name)
    echo(f"starting Triton Inference Server for {resource.name} ...")
    return serve_repository(
        resource.name, repo, cache_dir,
        models=[m for m in (names.engine, names.stream, names.client) if (Path(repo) / m).is_dir()],
        http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        engine_dir=str(engine_dir), task=resource.spec.model.task,
        exit_timeout_s=resource.spec.serving.drain_seconds,  # as the cluster's --exit-timeout-secs
    )


@dataclass
class Stopped:
    """What ``down`` found: the recorded server, whether it was still running, and how many of its
    processes (the server, or a dead server's orphaned stubs) were ended."""

    server: LocalServer
    was_running: bool
    ended: int


def down_name(name: str, cache_dir: Path, echo: Callable[[str], None] = lambda _: None) -> Optional[Stopped]:
    """Stop the named model's server (its whole process group) and forget it; None if nothing was recorded."""
    with model_lock(cache_dir, name, on_wait=lambda: echo(
            f"a `local up` of {name} is running; waiting for it to finish before stopping the server")):
        server = read_state(cache_dir, name)
        if server is None:
            return None
        was_running = server_running(server)
        if was_running and dead_stubs(server.pid):
            echo(f"{name}: a model process of its server died, and Triton cannot finish the requests it held: "
                 "stopping the server without waiting for them")
        return Stopped(server, was_running, end_server(cache_dir, server))


# ------------------------------------------------------------------ the click group
cache_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Engine cache (default ${ENV_CACHE} or ~/.cache/deepseek-operator).",
)
file_option = click.option(
    "-f", "--filename", "filename", type=click.Path(dir_okay=False), default=None,
    help="A DeepSeekModel YAML (default: the embedded tiny example, local/deepseek_local/examples/local-tiny.yaml).",
)


def _cache(cache_dir: Optional[Path]) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _name_of(filename: Optional[str]) -> str:
    """The model name of a CR file, or of the embedded example, without building anything."""
    if filename is None:
        raw = yaml.safe_load(EXAMPLES_DIR.joinpath(DEFAULT_EXAMPLE).read_text())
        return raw["metadata"]["name"]
    try:
        return api.load_resource_file(filename).name
    except api.SpecError as exc:
        raise LocalError(str(exc)) from None


def _infer_text(server: LocalServer, name: str, text: str) -> dict:
    """A classifier's label and probabilities, or an embedding, as plain JSON."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    tensor = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
    client = grpcclient.InferenceServerClient(server.endpoints["grpc"])
    try:
        result = client.infer(name, [tensor])
    except InferenceServerException as exc:
        raise LocalError(exc.message()) from None
    finally:
        client.close()
    if server.task == "text-classification":
        return {"label": result.as_numpy("label")[0, 0].decode("utf-8"),
                "probabilities": [round(float(p), 6) for p in result.as_numpy("probabilities")[0]]}
    return {"embedding": [round(float(v), 6) for v in result.as_numpy("embedding")[0]]}


@click.group("local")
def local() -> None:
    """Build and serve a DeepSeekModel on this machine with a real Triton Inference Server."""


@local.command("up")
@file_option
@click.option("--http-port", type=click.IntRange(0, 65535), default=DEFAULT_PORTS["http"], show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=DEFAULT_PORTS["grpc"], show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=DEFAULT_PORTS["metrics"], show_default=True)
@cache_option
def up(filename: Optional[str], http_port: int, grpc_port: int, metrics_port: int, cache_dir: Optional[Path]) -> None:
    """Build the engine (or reuse the cache), start Triton, and return once the model is ready."""
    cache = _cache(cache_dir)
    resource = load_resource(filename, cache)
    server = up_resource(resource, cache, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                         filename=filename)
    click.echo(f"{server.name} is ready (pid {server.pid}, task {server.task})")
    click.echo(f"  HTTP     {server.endpoints['http']}   (model {server.name})")
    stream_hint = f"   (streaming: model {server.name}_stream)" if server.task == "text-generation" else ""
    click.echo(f"  gRPC     {server.endpoints['grpc']}{stream_hint}")
    click.echo(f"  metrics  {server.endpoints['metrics']}")
    click.echo(f"  log      {server.log}")


@local.command("down")
@file_option
@cache_option
def down(filename: Optional[str], cache_dir: Optional[Path]) -> None:
    """Stop the model's Triton server."""
    name = _name_of(filename)
    cache = _cache(cache_dir)
    stopped = down_name(name, cache, echo=click.echo)
    if stopped is None:
        click.echo(f"{name} is not running{others_running(cache, name)}")
    elif stopped.was_running:
        click.echo(f"stopped {name} (pid {stopped.server.pid})")
    else:
        orphans = f"; ended {stopped.ended} orphaned process(es) it left" if stopped.ended else ""
        click.echo(f"{name} is not running (stale state, cleaned){orphans}")


@local.command("status")
@cache_option
def status(cache_dir: Optional[Path]) -> None:
    """List the models running locally (a dead server's leftovers are cleaned and reported)."""
    cache = _cache(cache_dir)
    rows, notes = [], []
    for path in sorted(state_dir(cache).glob("*.json")):
        with model_lock(cache, path.stem, wait=False) as locked:
            s = read_state(cache, path.stem)
            if s is None:
                continue
            if not locked:
                notes.append(f"{s.name}: busy (a `local up` or `down` of it is running)")
            elif server_running(s):
                rows.append(s)
            else:
                ended = end_server(cache, s)
                notes.append(f"{s.name}: not running (stale state, cleaned)"
                             + (f"; ended {ended} orphaned process(es) it left" if ended else ""))
    if not rows and not notes:
        click.echo("no local models")
        return
    if rows:
        click.echo(f"{'NAME':<24} {'STATE':<8} {'PID':>7}  {'HTTP':<24} {'GRPC':<18} METRICS")
    for s in rows:
        state = "running"
        if s.task == "text-generation" and (Path(s.repository) / ModelNames.of(s.name).stream).is_dir():
            # Triton keeps a model whose process died ready, and fails its every request: ask the model itself.
            from deepseek_model_repository.probe import PING_TIMEOUT_S, ping

            failing = ping("127.0.0.1", s.http_port, s.name, PING_TIMEOUT_S)
            if failing:
                state = "failing"
                notes.append(f"{s.name}: its model does not answer ({failing}); Triton does not start a model's "
                             f"process again: run `local down {s.name}` and `local up` (the log: {s.log})")
        click.echo(
            f"{s.name:<24} {state:<8} {s.pid:>7}  {s.endpoints['http']:<24} {s.endpoints['grpc']:<18} "
            f"{s.endpoints['metrics']}"
        )
    for note in notes:
        click.echo(note)


@local.command("generate")
@file_option
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--stream", is_flag=True, help="Print tokens as they are made (gRPC streaming).")
@click.option("--stop", "stops", multiple=True, help="A stop string (repeatable): the completion ends before it.")
@click.option("--timeout", "request_timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds the server may take over the request (it then answers with an error and frees the slot).")
@click.option("--min-tokens", type=click.IntRange(min=0), default=None,
              help="Neither the end-of-sentence token nor a stop string ends the completion before this many tokens.")
@click.option("--ignore-eos", is_flag=True, help="Generate max-tokens tokens whatever the end-of-sentence token says.")
@cache_option
def generate(
    filename: Optional[str], prompt: str, max_tokens: int, temperature: float, seed: Optional[int], stream: bool,
    stops: tuple[str, ...], request_timeout_s: Optional[float], min_tokens: Optional[int], ignore_eos: bool,
    cache_dir: Optional[Path],
) -> None:
    """Send PROMPT to the running model and print the completion (a classifier's label, an embedding)."""
    from deepseek_model_repository.client import GenerationClient, ServingError

    name = _name_of(filename)
    cache = _cache(cache_dir)
    server = read_state(cache, name)
    if server is None or not server_running(server):
        raise LocalError(f"{name} is not running{others_running(cache, name)}: start it with "
                         f"{command('up', filename, cache)}")
    if server.task != "text-generation":
        click.echo(json.dumps(_infer_text(server, name, prompt)))
        return
    client = GenerationClient(server.endpoints["grpc"], name)
    controls = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stops, min_tokens=min_tokens,
                    ignore_eos=ignore_eos or None)
    try:
        if stream:
            for piece in client.stream(prompt, request_timeout_s=request_timeout_s, **controls):
                click.echo(piece, nl=False)
            click.echo()
        else:
            click.echo(client.generate(prompt, request_timeout_s=request_timeout_s, **controls))
    except ServingError as exc:
        raise LocalError(str(exc)) from None
    finally:
        client.close()
