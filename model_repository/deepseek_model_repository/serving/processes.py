"""Triton's processes as /proc and Triton's log show them: which Python-backend stub serves which model, which
stubs have initialized, and which of those Triton lost.

Each model instance of the Python backend runs in a stub process, a child of tritonserver, started with the
model's ``<model>/<version>/model.py``. The serving bench counts each one's CPU by the model it serves, and a
stub of a text-generation model prints its threads when signalled (``serving.triton.dump_threads_on_signal``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional, TextIO

PROC = Path("/proc")

#: What each of these models' stubs prints to Triton's log as its ``initialize`` ends (:func:`announce_initialized`).
INITIALIZED = "deepseek_model_repository: initialized"
_ANNOUNCED = re.compile(re.escape(INITIALIZED) + r" model '([^']+)'")


def announce_initialized(args: dict, stream: Optional[TextIO] = None) -> None:
    """Say in Triton's log (a stub's stderr) that this instance's ``initialize`` has ended, from ``initialize``'s
    own args: the local mode tells a load Triton lost from a slow one by it (``deepseek_local.local.wait_ready``)."""
    print(f"{INITIALIZED} model '{args.get('model_name', '')}' instance '{args.get('model_instance_name', '')}'",
          file=stream or sys.stderr, flush=True)


def initialized_models(log_text: str) -> set[str]:
    """The models one of whose stubs announced in ``log_text`` that its ``initialize`` ended."""
    return set(_ANNOUNCED.findall(log_text))


#: How long Triton may take to report a model loaded once its process has said that its ``initialize`` ended (it
#: takes milliseconds): past it, Triton lost that process (:func:`lost_initializations`).
LOST_INIT_S = 20.0
#: How tritonserver 2.51 dies, instead, when it cannot take a starved model process's health lock in time (upstream
#: triton-inference-server/server#8882).
STARVED_ABORT = "boost::interprocess::lock_exception"
#: What to say of a server that aborted so (``deepseek_local.local.wait_ready``, ``supervise``).
STARVED_ABORTED = (f"tritonserver aborted ({STARVED_ABORT}) as a model's process initialized: Triton 2.51's other "
                   "answer to a model process that misses its health check on a machine short of CPU")
#: What Triton's log says once it has loaded a model, or failed to.
_LOADED, _FAILED = "successfully loaded '{}'", "failed to load '{}'"


def load_event(line: str) -> bool:
    """Whether a line of Triton's log is one that :func:`lost_initializations` reads."""
    return INITIALIZED in line or any(said.split("{}")[0] in line for said in (_LOADED, _FAILED))


def lost_initialization(model: str, grace_s: float) -> str:
    """What to say of a model whose process Triton lost (:func:`lost_initializations`)."""
    return (f"Triton lost the process of model {model}: it initialized {grace_s:.0f}s ago and Triton has not loaded it "
            "(Triton 2.51 gives up on a model process that misses its one-second health check while it initializes, "
            "on a machine short of CPU, and then waits for ever)")


def lost_initializations(log_text: str, announced_at: dict[str, float], now: float, grace_s: float) -> list[str]:
    """The models whose process announced in ``log_text`` that its ``initialize`` ended (:func:`announce_initialized`)
    more than ``grace_s`` before ``now`` and that Triton has not reported loaded (or failed) since: Triton 2.51 gives
    up on a model process that misses its one-second health check as it initializes (starved of CPU), yet the process
    goes on, and Triton waits for it to exit, for ever, never starting to serve. ``announced_at`` (model -> when this
    caller first saw it announced) is updated."""
    for model in initialized_models(log_text):
        announced_at.setdefault(model, now)
    return sorted(model for model, seen in announced_at.items()
                  if now - seen > grace_s and _LOADED.format(model) not in log_text
                  and _FAILED.format(model) not in log_text)


def stat_fields(pid: int, proc: Path = PROC) -> Optional[list[str]]:
    """``/proc/PID/stat`` from its third field on (after "pid (comm) "), or None for a process gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def children(pid: int, proc: Path = PROC) -> list[int]:
    """The processes whose parent is ``pid`` (Triton's Python-backend stubs)."""
    return [int(entry.name) for entry in proc.iterdir()
            if entry.name.isdigit() and (fields := stat_fields(int(entry.name), proc)) and int(fields[1]) == pid]


#: The Python backend's stub, as a process's name (``comm``, which the kernel cuts to 15 characters) says.
STUB_COMM = "triton_python_backend_stub"[:15]


def is_stub(pid: int, proc: Path = PROC) -> bool:
    """Whether ``pid`` is a Python-backend stub, from its name alone: an exited one's command line reads empty."""
    try:
        return (proc / str(pid) / "comm").read_text().strip() == STUB_COMM
    except OSError:
        return False


def dead_stubs(pid: int, proc: Path = PROC) -> list[int]:
    """The Python-backend stubs of ``pid`` (tritonserver) that have exited and that it has not reaped: they died, since
    tritonserver waits for each stub it stops, and it never starts a dead one again."""
    return [child for child in children(pid, proc)
            if (fields := stat_fields(child, proc)) and fields[0] == "Z" and is_stub(child, proc)]


def stub_model(pid: int, proc: Path = PROC) -> Optional[str]:
    """The model a Python-backend stub serves: the folder of the ``<model>/<version>/model.py`` it was given."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    script = next((a.decode() for a in argv if a.endswith(b"model.py")), None)
    return Path(script).parent.parent.name if script else None
