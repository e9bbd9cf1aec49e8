"""Run tritonserver in a Triton pod, and end it when Triton lost a model's process as it initialized.

Triton 2.51 gives up on a Python-backend process that misses its one-second health check during ``initialize`` (in
a container short of CPU, throttled at its limit, say), yet the process goes on: Triton then waits for it to exit,
for ever, and never starts its HTTP and gRPC services. Left alone, such a pod waits for its startup probe to run out
(10 minutes) before the kubelet starts the container again.

So the Triton container runs this as its command, with tritonserver's command line after ``--``. It starts
tritonserver as its child, passes its output on line by line, and reads there the line that each of this package's
models prints as its ``initialize`` ends (``serving.processes.announce_initialized``). Once a model announced so
``--lost-after`` seconds ago and Triton has reported it neither loaded nor failed, Triton lost that process: this
kills tritonserver and its model processes and exits with status 75 (``LOST_EXIT``), naming the model, and the kubelet
starts the container again at once. SIGTERM and SIGINT go on to tritonserver, which drains its requests
(``--exit-timeout-secs``); otherwise this exits with tritonserver's own status::

    python3 -m deepseek_model_repository.supervise [--lost-after SECONDS] -- tritonserver ARG ...
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

from .serving.processes import LOST_INIT_S, STARVED_ABORT, load_event, lost_initializations

#: The exit status when Triton lost a model's process (EX_TEMPFAIL: starting again is the remedy).
LOST_EXIT = 75
#: How often the watch looks for a lost model process, in seconds.
POLL_S = 0.5
PROG = f"python3 -m {__name__}"


def supervise_command(server: Sequence[str]) -> list[str]:
    """The Triton container's command: ``server`` (tritonserver's command line) run under this watch."""
    return ["python3", "-m", __name__, "--", *server]


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


def supervise(server: Sequence[str], lost_after_s: float = LOST_INIT_S, *, out: Optional[BinaryIO] = None,
              err: Optional[TextIO] = None) -> int:
    """Run ``server`` to its end and return the exit status this command should have (above)."""
    err = err or sys.stderr
    stopping: list[int] = []  # the signals to pass on
    children: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        if children and children[0].poll() is None:
            os.kill(children[0].pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        child = subprocess.Popen(list(server), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"{PROG}: cannot start {server[0]}: {exc}", file=err, flush=True)
        return 127
    children.append(child)
    if stopping:  # told to stop while it started
        os.kill(child.pid, stopping[0])
    output = _Output(child.stdout, out or sys.stdout.buffer)
    announced_at: dict[str, float] = {}
    try:
        while True:
            try:
                status = child.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if stopping:
                continue
            lost = lost_initializations(output.text(), announced_at, time.monotonic(), lost_after_s)
            if lost:
                print(f"{PROG}: Triton lost the process of model {lost[0]}: it initialized {lost_after_s:.0f}s ago "
                      "and Triton has not loaded it (Triton 2.51 gives up on a model process that misses its "
                      "one-second health check while it initializes, on a machine short of CPU, and then waits for "
                      "ever); ending tritonserver so that the container starts again", file=err, flush=True)
                os.killpg(child.pid, signal.SIGKILL)  # its loading thread never sees a SIGTERM; stubs included
                child.wait()
                return LOST_EXIT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        output.thread.join(timeout=5)
    if status != 0 and output.aborted:
        print(f"{PROG}: tritonserver aborted ({STARVED_ABORT}), Triton 2.51's other answer to a model process that "
              "misses its health check as it initializes on a machine short of CPU; starting it again is the remedy",
              file=err, flush=True)
    return status if status >= 0 else 128 - status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--lost-after", type=float, default=LOST_INIT_S, metavar="SECONDS",
                        help="how long after a model's process announced that its initialize ended Triton may take "
                             f"to report the model loaded (default {LOST_INIT_S:g})")
    parser.add_argument("server", nargs=argparse.REMAINDER, help="-- and then tritonserver's command line")
    args = parser.parse_args(argv)
    server = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not server:
        parser.error("give the server's command line after --, e.g. -- tritonserver --model-repository=/models")
    if args.lost_after <= 0:
        parser.error(f"--lost-after must be a positive number of seconds, not {args.lost_after:g}")
    return supervise(server, args.lost_after)


if __name__ == "__main__":
    sys.exit(main())
