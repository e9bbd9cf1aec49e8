"""Triton 2.51 gives up on a model process that misses its one-second health check while it initializes (a machine
short of CPU), yet the process goes on: Triton then waits for it to exit, for ever, and never starts serving. The
local mode tells that from a slow load by the line each of these models' processes prints as its initialize ends
(``serving.processes.announce_initialized``), stops that server and starts it once more; in a Triton pod the
container's command (``deepseek_model_repository.supervise``) ends that server, and the kubelet starts it again. The
same watch stops a server whose model process died, which Triton 2.51 never starts again."""

import os
import signal
import subprocess
import sys
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
import faulthandler
import time

from deepseek_model_repository.serving.processes import announce_initialized


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable()  # as this package's models do: a crash prints the stack to Triton's log
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
                or f"tritonserver aborted ({processes.STARVED_ABORT}) as a model's process initialized" in said)
        assert "starting the server again" in said
        assert time.monotonic() - started < 60
    finally:
        local.down_name("lost", tmp_path)


def gone(pid: int) -> bool:
    fields = processes.stat_fields(pid)
    return fields is None or fields[0] == "Z"


def test_the_triton_pods_watch_ends_a_server_that_lost_a_model_process_so_the_kubelet_starts_it_again(tmp_path):
    """The Triton container's command (``deepseek_model_repository.supervise``) on a real tritonserver, whose model
    process is stopped for 2.5 s in its initialize: it ends tritonserver and that process and exits with status 75."""
    repo = tmp_path / "repository"
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(MODEL)
    install = local.find_triton()
    server = local.server_argv(install, repo, tmp_path, http_port=local.free_port(), grpc_port=local.free_port(),
                               metrics_port=local.free_port(), shm_prefix=f"deepseek_supervise_{os.getpid()}_")
    watch = subprocess.Popen([sys.executable, "-m", "deepseek_model_repository.supervise", "--lost-after=3",
                              "--poll=0.5", "--", *server], env=local.server_env(install), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (stub := instance_stub("slow_0_0")) is None:
            time.sleep(0.05)
        assert stub is not None, "tritonserver started no process for model slow"
        triton = int(processes.stat_fields(stub)[1])
        time.sleep(0.3)  # in its initialize
        os.kill(stub, signal.SIGSTOP)
        time.sleep(2.5)  # past Triton's one-second health check
        os.kill(stub, signal.SIGCONT)
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait()
        local.remove_shm(f"deepseek_supervise_{os.getpid()}_")
    said = err.decode()
    if watch.returncode == 75:
        assert "Triton lost the process of model slow: it initialized 3s ago" in said
        assert "ending tritonserver so that the container starts again" in said
        assert b"deepseek_model_repository: initialized model 'slow'" in out  # Triton's output, passed on
    else:  # Triton's other answer (once in a full run): it aborts, and the container's status says it failed
        assert watch.returncode != 0 and f"tritonserver aborted ({processes.STARVED_ABORT})" in said, said
    time.sleep(0.5)  # the killed stub's new parent reaps it
    assert gone(triton) and gone(stub)


def test_the_triton_pods_watch_stops_a_server_whose_model_process_died_so_the_kubelet_starts_it_again(tmp_path):
    """Triton 2.51 never starts a dead model process again and keeps the model ready, failing its every request;
    the watch sees the stub exited and not reaped, stops tritonserver (it drains) and exits with status 70."""
    repo = tmp_path / "repository"
    (repo / "quick" / "1").mkdir(parents=True)
    (repo / "quick" / "config.pbtxt").write_text(CONFIG.replace('"slow"', '"quick"'))
    (repo / "quick" / "1" / "model.py").write_text(MODEL.replace("time.sleep(2)", "pass"))
    install = local.find_triton()
    http = local.free_port()
    prefix = f"deepseek_supervise_died_{os.getpid()}_"
    server = local.server_argv(install, repo, tmp_path, http_port=http, grpc_port=local.free_port(),
                               metrics_port=local.free_port(), shm_prefix=prefix)
    watch = subprocess.Popen([sys.executable, "-m", "deepseek_model_repository.supervise", "--poll=0.5", "--", *server],
                             env=local.server_env(install), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    triton = None
    try:
        local.wait_ready(watch.pid, http, ["quick"], tmp_path / "no.log", timeout=60)  # the watch passes it on
        (triton,) = processes.children(watch.pid)
        (stub,) = [pid for pid in processes.children(triton) if processes.stub_model(pid) == "quick"]
        time.sleep(1.5)  # serving, seen by the watch
        os.kill(stub, signal.SIGSEGV)
        died = time.monotonic()
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait()
        if triton is not None and not gone(triton):  # a session of its own
            os.killpg(triton, signal.SIGKILL)
        local.remove_shm(prefix)
    assert watch.returncode == 70, err
    said = err.decode()
    assert f"the process of model quick (pid {stub}) died" in said
    assert "stopping tritonserver so that the container starts again" in said
    assert b"Fatal Python error: Segmentation fault" in out  # the stub's stack, in Triton's output passed on
    assert time.monotonic() - died < 20  # the exit timeout (5 s) and Triton's unload, not a probe's minute
    time.sleep(0.5)
    assert gone(triton)
