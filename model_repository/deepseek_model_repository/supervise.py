"""Run tritonserver in a Triton pod, and end it when one of its model processes is lost or dead, so that the kubelet
starts the container again at once.

Two ways in which Triton 2.51 keeps a pod that cannot serve:

- It gives up on a Python-backend process that misses its one-second health check during ``initialize`` (in a
  container short of CPU, throttled at its limit, say), yet the process goes on: Triton then waits for it to exit,
  for ever, and never starts its HTTP and gRPC services. Left alone, such a pod waits for its startup probe to run
  out (10 minutes).
- A model process that dies (a segfault in a native library, the kernel's OOM killer) is never started again, and
  Triton goes on reporting the model ready while it fails each of its requests. A text-generation pod's liveness
  probe finds that within about a minute; a classification or embedding pod's (Triton's ``/v2/health/live``) never.

So the Triton container runs this as its command, with tritonserver's command line after ``--``. It starts
tritonserver as its child and passes its output on line by line.

- It reads there the line that each of this package's models prints as its ``initialize`` ends
  (``serving.processes.announce_initialized``). Once a model announced so ``--lost-after`` seconds ago and Triton has
  reported it neither loaded nor failed, Triton lost that process: this kills tritonserver and its model processes
  and exits with status 75 (``LOST_EXIT``), naming the model.
- It looks at tritonserver's model processes (``/proc``) every ``--poll`` seconds (2), as it reads the log: one that
  has exited and that Triton has not reaped (a process Triton stops, it waits for) has died. This tells tritonserver
  to stop (SIGTERM: it stops taking requests and drains the others for its ``--exit-timeout-secs``), kills what is
  left after that and a margin, and exits with status 70 (``DIED_EXIT``), naming the model.

SIGTERM and SIGINT go on to tritonserver, which drains its requests; otherwise this exits with tritonserver's own
status::

    python3 -m deepseek_model_repository.supervise [--lost-after SECONDS] [--poll SECONDS] -- tritonserver ARG ...
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import BinaryIO, Optional, Sequence, TextIO

from .serving.processes import (LOST_INIT_S, STARVED_ABORT, STARVED_ABORTED, children, is_stub, load_event,
                                lost_initialization, lost_initializations, stat_fields, stub_model)

#: The exit status when Triton lost a model's process (EX_TEMPFAIL: starting again is the remedy).
LOST_EXIT = 75
#: The exit status when one of tritonserver's model processes died (EX_SOFTWARE).
DIED_EXIT = 70
#: tritonserver's own default for --exit-timeout-secs.
TRITON_EXIT_TIMEOUT_S = 30.0
#: How long past its exit timeout a tritonserver told to stop gets before it is killed.
STOP_MARGIN_S = 15.0
#: How often the watch looks for a lost or dead model process, in seconds (0.5% of a core, measured; every 0.5 s
#: took 1.2%).
POLL_S = 2.0
MODULE = f"{__package__}.supervise"  # also when run as __main__
PROG = f"python3 -m {MODULE}"
#: What a dead model process is called when it died before this watch first saw it.
UNKNOWN_MODEL = "(unknown: it died before a first look)"


def supervise_command(server: Sequence[str]) -> list[str]:
    """The Triton container's command: ``server`` (tritonserver's command line) run under this watch."""
    return ["python3", "-m", MODULE, "--", *server]


class _Output:
    """Passes the server's output on, keeping the lines that tell which models initialized and loaded."""

    def __init__(self, source: BinaryIO, sink: BinaryIO):
        self.source, self.sink = source, sink
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.aborted = False
        self.thread = threading.Thread(target=self._pump, name="tritonserver-output", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for line in iter(self.source.readline, b""):
            try:
                self.sink.write(line)
                self.sink.flush()
            except (OSError, ValueError):  # whoever reads our output went away: keep the server running
                pass
            text = line.decode(errors="replace")
            if load_event(text) or STARVED_ABORT in text:
                with self.lock:
                    self.events.append(text)
                    self.aborted = self.aborted or STARVED_ABORT in text

    def text(self) -> str:
        with self.lock:
            return "".join(self.events)


class _ModelProcesses:
    """tritonserver's model processes (Python-backend stubs), by pid, and which of them died: a stub that has exited
    and that tritonserver has not reaped, at two looks in a row (it waits for each stub it stops, and for the
    short-lived ones that complete a model's configuration)."""

    def __init__(self, server_pid: int):
        self.server = server_pid
        self.models: dict[int, str] = {}
        self.exited: set[int] = set()

    def died(self) -> list[tuple[int, str]]:
        for pid in children(self.server):
            if pid not in self.models:
                model = stub_model(pid)
                if model is None and is_stub(pid):  # it exited before a first look: its command line reads empty
                    model = UNKNOWN_MODEL
                if model is not None:
                    self.models[pid] = model
        dead = []
        for pid, model in list(self.models.items()):
            fields = stat_fields(pid)
            if fields is None:  # reaped: tritonserver ended it, and knows
                del self.models[pid]
                self.exited.discard(pid)
            elif fields[0] == "Z":
                if pid in self.exited:
                    dead.append((pid, model))
                self.exited.add(pid)
            else:
                self.exited.discard(pid)
        return dead


def _exit_timeout(server: Sequence[str]) -> float:
    """The --exit-timeout-secs that ``server`` (tritonserver's command line) gives, else Triton's default."""
    for arg in server:
        if arg.startswith("--exit-timeout-secs="):
            try:
                return float(arg.split("=", 1)[1])
            except ValueError:
                break
    return TRITON_EXIT_TIMEOUT_S


def supervise(server: Sequence[str], lost_after_s: float = LOST_INIT_S, *, poll_s: float = POLL_S,
              out: Optional[BinaryIO] = None, err: Optional[TextIO] = None) -> int:
    """Run ``server`` to its end and return the exit status this command should have (above)."""
    err = err or sys.stderr
    stopping: list[int] = []  # the signals to pass on
    started: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        if started and started[0].poll() is None:
            os.kill(started[0].pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        child = subprocess.Popen(list(server), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"{PROG}: cannot start {server[0]}: {exc}", file=err, flush=True)
        return 127
    started.append(child)
    if stopping:  # told to stop while it started
        os.kill(child.pid, stopping[0])
    output = _Output(child.stdout, out or sys.stdout.buffer)
    stubs = _ModelProcesses(child.pid)
    # Popen.wait with a timeout polls every 50 ms; a thread blocked in waitpid wakes this loop only when it must.
    waiter = threading.Thread(target=child.wait, name="tritonserver-exit", daemon=True)
    waiter.start()
    announced_at: dict[str, float] = {}
    try:
        while True:
            waiter.join(timeout=poll_s)
            if not waiter.is_alive():
                status = child.returncode
                break
            if stopping:
                continue
            lost = lost_initializations(output.text(), announced_at, time.monotonic(), lost_after_s)
            if lost:
                print(f"{PROG}: {lost_initialization(lost[0], lost_after_s)}; ending tritonserver so that the "
                      "container starts again", file=err, flush=True)
                os.killpg(child.pid, signal.SIGKILL)  # its loading thread never sees a SIGTERM; stubs included
                waiter.join()
                return LOST_EXIT
            dead = stubs.died()
            if dead:
                pid, model = dead[0]
                print(f"{PROG}: the process of model {model} (pid {pid}) died, and Triton 2.51 never starts it again "
                      "while it goes on failing the model's requests (its stack, where Python could print it, is in "
                      "the log above); stopping tritonserver so that the container starts again", file=err, flush=True)
                os.kill(child.pid, signal.SIGTERM)  # it stops taking requests and drains the others
                waiter.join(timeout=_exit_timeout(server) + STOP_MARGIN_S)
                if waiter.is_alive():
                    os.killpg(child.pid, signal.SIGKILL)
                    waiter.join()
                return DIED_EXIT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        output.thread.join(timeout=5)
    if status != 0 and output.aborted:
        print(f"{PROG}: {STARVED_ABORTED}; starting it again is the remedy", file=err, flush=True)
    return status if status >= 0 else 128 - status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--lost-after", type=float, default=LOST_INIT_S, metavar="SECONDS",
                        help="how long after a model's process announced that its initialize ended Triton may take "
                             f"to report the model loaded (default {LOST_INIT_S:g})")
    parser.add_argument("--poll", type=float, default=POLL_S, metavar="SECONDS",
                        help=f"how often to look for a lost or dead model process (default {POLL_S:g})")
    parser.add_argument("server", nargs=argparse.REMAINDER, help="-- and then tritonserver's command line")
    args = parser.parse_args(argv)
    server = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not server:
        parser.error("give the server's command line after --, e.g. -- tritonserver --model-repository=/models")
    for flag, value in (("--lost-after", args.lost_after), ("--poll", args.poll)):
        if not value > 0:
            parser.error(f"{flag} must be a positive number of seconds, not {value:g}")
    return supervise(server, args.lost_after, poll_s=args.poll)


if __name__ == "__main__":
    sys.exit(main())
