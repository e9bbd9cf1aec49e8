"""The Triton container's command, ``deepseek_model_repository.supervise``, around a small real child process: it
passes the child's output on, passes SIGTERM on (tritonserver drains then), and exits with the child's status. Its
watch over a real tritonserver that lost a model's process is in tests/integration/test_local_lost_initialization.py."""

import os
import signal
import subprocess
import sys
import time

import pytest

from deepseek_model_repository.serving import processes
from deepseek_model_repository.supervise import supervise_command

DRAINS = """
import signal, sys, time
def drain(signum, frame):
    print("draining after signal", signum, flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, drain)
print("serving", flush=True)
time.sleep(60)
"""


def watch(*server: str) -> subprocess.Popen:
    command = supervise_command(list(server))
    assert command[:4] == ["python3", "-m", "deepseek_model_repository.supervise", "--"]
    return subprocess.Popen([sys.executable, *command[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_goes_on_to_the_server_and_its_exit_status_is_the_containers():
    proc = watch(sys.executable, "-c", DRAINS)
    try:
        assert proc.stdout.readline() == b"serving\n"  # passed on as the child wrote it
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 7, err
    assert out == f"draining after signal {int(signal.SIGTERM)}\n".encode()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("script, status", [("import sys; print('bye'); sys.exit(0)", 0),
                                            ("import sys; sys.exit(3)", 3),
                                            ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9)])
def test_the_servers_own_exit_is_passed_on(script, status):
    proc = watch(sys.executable, "-c", script)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == status, err
    assert out == (b"bye\n" if status == 0 else b"")


@pytest.mark.parametrize("args, status, says", [
    ([], 2, "give the server's command line after --"),
    (["--lost-after=0", "--", "tritonserver"], 2, "--lost-after must be a positive number of seconds, not 0"),
    (["--poll=-1", "--", "tritonserver"], 2, "--poll must be a positive number of seconds, not -1"),
    (["--", "/nonexistent/tritonserver"], 127, "cannot start /nonexistent/tritonserver"),
])
def test_a_bad_command_line_says_what_to_fix(args, status, says):
    proc = subprocess.run([sys.executable, "-m", "deepseek_model_repository.supervise", *args], capture_output=True,
                          timeout=20)
    assert proc.returncode == status
    assert says in proc.stderr.decode()


@pytest.mark.parametrize("module", ["deepseek_model_repository.supervise", "deepseek_model_repository.probe"])
def test_the_commands_a_triton_pod_runs_beside_the_server_stay_lean(module):
    """The watch lives as long as the pod and the liveness probe starts every 10 s: neither imports tritonclient or
    protobuf (the package's names are imported when first used)."""
    script = (f"import sys, {module}; import deepseek_model_repository as package; "
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tritonclient', 'google', 'grpc')); "
              "assert not heavy, heavy; assert package.write_repository.__module__.endswith('.repository')")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


SERVER = """
import ctypes, os, subprocess, sys, time
# A model process that runs and is killed, one that names itself as Triton's stub does and exits at once, and one
# that exits and is reaped: a server that reaps only the last, as tritonserver reaps the stubs it stops.
os.makedirs(sys.argv[1] + "/m/1", exist_ok=True)
script = sys.argv[1] + "/m/1/model.py"
open(script, "w").write("import time; time.sleep(60)")
model = subprocess.Popen([sys.executable, script])
quick = os.fork()
if quick == 0:
    ctypes.CDLL(None).prctl(15, b"triton_python_backend_stub")  # PR_SET_NAME: the kernel keeps 15 characters
    os._exit(0)
subprocess.run([sys.executable, "-c", "pass"])
while open(f"/proc/{quick}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
print(model.pid, quick, flush=True)
time.sleep(60)
"""


def test_the_watch_finds_model_processes_that_exited_unreaped_named_or_not(tmp_path):
    from deepseek_model_repository.supervise import UNKNOWN_MODEL, _ModelProcesses

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        model, quick = map(int, server.stdout.readline().split())
        watch = _ModelProcesses(server.pid)
        # Exited once is not enough (tritonserver may be about to reap it); the reaped one is not theirs to count.
        assert watch.died() == [] and watch.models == {model: "m", quick: UNKNOWN_MODEL}
        os.kill(model, signal.SIGKILL)
        time.sleep(0.3)
        assert watch.died() == [(quick, UNKNOWN_MODEL)]
        assert processes.dead_stubs(server.pid) == [quick]  # what `local down` asks: stubs by name alone
        assert sorted(watch.died()) == sorted([(model, "m"), (quick, UNKNOWN_MODEL)])
    finally:
        server.kill()
        server.wait()


def test_a_server_that_aborts_on_the_starved_health_lock_is_named_and_its_status_passed_on():
    from deepseek_model_repository.serving.processes import STARVED_ABORT

    script = (f"import os, sys; print(\"terminate called after throwing an instance of '{STARVED_ABORT}'\", "
              "flush=True); os.abort()")
    proc = watch(sys.executable, "-c", script)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGABRT
    assert STARVED_ABORT.encode() in out  # its output, passed on
    assert f"tritonserver aborted ({STARVED_ABORT}) as a model's process initialized" in err.decode()
    assert "starting it again is the remedy" in err.decode()
