"""Triton 2.51 gives up on a model process that misses its one-second health check while it initializes (a machine
short of CPU), yet the process goes on: Triton then waits for it to exit, for ever, and never starts serving. The
local mode tells that from a slow load by the line each of these models' processes prints as its initialize ends
(``serving.processes.announce_initialized``), stops that server and starts it once more."""

import os
import signal
import threading
import time

from deepseek_local import local
from deepseek_model_repository.serving import processes

CONFIG = """
name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "in" data_type: TYPE_STRING dims: [ 1, 1 ] } ]
output [ { name: "out" data_type: TYPE_STRING dims: [ 1, 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

MODEL = """
import time

from deepseek_model_repository.serving.processes import announce_initialized


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(2)
        announce_initialized(args)

    def execute(self, requests):
        return [None for _ in requests]
"""


def instance_stub(instance: str):
    """The pid of the stub that runs ``instance`` (its arguments name it; the auto-complete stub's do not)."""
    for entry in processes.PROC.iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"triton_python_backend_stub") and instance.encode() in argv:
                return int(entry.name)
    return None


def test_a_model_process_that_triton_lost_as_it_initialized_gets_the_server_started_again(tmp_path, capsys):
    repo = tmp_path / "repository"
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(MODEL)
    stopped = []

    def stop_the_first_stub_for_a_while():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (pid := instance_stub("slow_0_0")) is None:
            time.sleep(0.05)
        time.sleep(0.3)  # in its initialize
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        time.sleep(2.5)  # past Triton's one-second health check
        os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=stop_the_first_stub_for_a_while, daemon=True)
    thread.start()
    started = time.monotonic()
    server = local.serve_repository("lost", repo, tmp_path, models=["slow"], http_port=0, grpc_port=0,
                                    metrics_port=0, lost_after_s=3)
    try:
        thread.join(5)
        said = capsys.readouterr().err
        assert stopped and stopped[0] != instance_stub("slow_0_0")  # a second process serves it
        # Triton waited for ever, or (once in a full run) aborted as it failed to take the stub's health lock.
        assert ("Triton lost the process of model slow: it initialized 3s ago" in said
                or f"tritonserver aborted ({local.STARVED_ABORT}) as a model's process initialized" in said)
        assert "starting the server again" in said
        assert time.monotonic() - started < 60
    finally:
        local.down_name("lost", tmp_path)
