"""The Triton container's command, ``deepseek_model_repository.supervise``, around a small real child process: it
passes the child's output on, passes SIGTERM on (tritonserver drains then), and exits with the child's status. Its
watch over a real tritonserver that lost a model's process is in tests/integration/test_local_lost_initialization.py."""

import signal
import subprocess
import sys
import time

import pytest

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
