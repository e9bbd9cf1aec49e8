"""The local mode's server lifecycle under concurrency and crashes, and where secrets do not go.

Everything runs through the real `deepseek-operator` console script (separate processes, as users run
it) against the real tritonserver bundled with PyTriton, on loopback ports chosen by the OS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from deepseek_local import local

pytestmark = [pytest.mark.slow]

NAME = "deepseek-tiny"
EXE = str(Path(sys.executable).parent / "deepseek-operator")
#: Planted in the environment of every command below; none of it may show up anywhere.
SECRETS = {
    "HF_TOKEN": "hf_plantedSecretToken0123456789",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "planted/Secret+Access+Key/0123456789abcdef",
    "DEEPSEEK_TEST_PASSWORD": "planted-password-0xC0FFEE",
}


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, **SECRETS, local.ENV_CACHE: str(cache), "OMP_NUM_THREADS": "1"}


def cli(cache: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], env=env(cache), capture_output=True, text=True, timeout=timeout)


def up_process(cache: Path) -> subprocess.Popen:
    return subprocess.Popen([EXE, "local", "up", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                            env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def up(cache: Path) -> tuple[subprocess.CompletedProcess, local.LocalServer]:
    result = cli(cache, "local", "up", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    state = local.read_state(cache, NAME)
    assert state is not None and local.server_running(state)
    return result, state


def servers_of(repository: str) -> list[int]:
    """tritonserver processes (not zombies) serving ``repository``, wherever they came from."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"tritonserver") and f"--model-repository={repository}".encode() in argv \
                and local.pid_alive(int(entry)):
            found.append(int(entry))
    return found


def shm_regions(prefix: str) -> list[Path]:
    return sorted(local.SHM_DIR.glob(f"{prefix}*")) if prefix else []


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("local-lifecycle")


@pytest.fixture(scope="module")
def first_up(cache):
    """The first `local up` in a fresh cache (the tiny model is made and built, secrets planted), one
    generate, then `down`: every output, the log and each server process's environment, for the secret test."""
    result, state = up(cache)
    pids = [state.pid] + [p for p in local.group_members(state.pgid) if p != state.pid]
    assert len(pids) >= 3, "tritonserver and the Python stubs of its models share one process group"
    environs = {pid: Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace") for pid in pids}
    generated = cli(cache, "local", "generate", "--max-tokens", "4", "Hello")
    status = cli(cache, "local", "status")
    down = cli(cache, "local", "down")
    assert down.returncode == 0 and f"stopped {NAME}" in down.stdout
    assert not local.group_members(state.pgid) and not shm_regions(state.shm_prefix)
    return {"state": state, "environs": environs,
            "outputs": [r.stdout + r.stderr for r in (result, generated, status, down)]}


def test_secrets_reach_no_output_log_process_repository_or_rendered_object(first_up, cache, tmp_path):
    state = first_up["state"]
    assert "build] export: started" in first_up["outputs"][0], "a full build log was checked"
    texts = {f"output {i}": text for i, text in enumerate(first_up["outputs"])}
    texts["tritonserver.log"] = Path(state.log).read_text(errors="replace")
    for pid, environ in first_up["environs"].items():
        texts[f"/proc/{pid}/environ"] = environ
        names = {kv.split("=", 1)[0] for kv in environ.split("\0") if kv}
        assert not names & set(SECRETS), f"process {pid} got {names & set(SECRETS)}"
    for root in (Path(state.repository), Path(state.engine_dir)):
        for path in root.rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_bytes().decode("latin-1")
    cr = tmp_path / "with-credentials.yaml"
    cr.write_text(yaml.safe_dump({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "metadata": {"name": "private"},
        "spec": {"model": {"source": "hf://org/private-model", "credentialsSecret": "private-hf-token"},
                 "engine": {"backend": "tensorrt", "precision": "fp16"}},
    }))
    rendered = cli(cache, "render", "-f", str(cr))
    assert rendered.returncode == 0, rendered.stderr
    assert "private-hf-token" in rendered.stdout, "the Secret is referenced by name"
    texts["render"] = rendered.stdout + rendered.stderr
    for where, text in texts.items():
        for key, value in SECRETS.items():
            assert value not in text, f"{key}'s value leaked into {where}"


def test_two_concurrent_ups_leave_exactly_one_server_that_status_and_down_see(first_up, cache):
    a, b = up_process(cache), up_process(cache)
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert sorted([a.returncode, b.returncode]) == [0, 1], out_a + out_b
    loser = out_b if b.returncode else out_a
    assert "is already running" in loser and "Traceback" not in loser
    state = local.read_state(cache, NAME)
    assert servers_of(state.repository) == [state.pid]
    status = cli(cache, "local", "status")
    assert f"{NAME:<24} running  {state.pid:>7}" in status.stdout
    down = cli(cache, "local", "down")
    assert f"stopped {NAME} (pid {state.pid})" in down.stdout
    assert servers_of(state.repository) == [] and not local.group_members(state.pgid)


def kill_server_mid_request(state: local.LocalServer) -> list[int]:
    """kill -9 tritonserver while a long generation is in flight; returns the stubs it orphaned."""
    from deepseek_model_repository.client import GenerationClient

    client = GenerationClient(state.endpoints["grpc"], NAME)
    thread = threading.Thread(target=lambda: _ignore_errors(client.generate, "Hello " * 20, max_tokens=200),
                              daemon=True)
    thread.start()
    time.sleep(0.5)
    os.kill(state.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while local.pid_alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    thread.join(timeout=30)
    client.close()
    return local.group_members(state.pgid)


def _ignore_errors(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - the server is killed under this request on purpose
        pass


def test_down_after_kill_9_ends_the_orphaned_stubs_and_says_the_server_was_dead(first_up, cache):
    _, state = up(cache)
    orphans = kill_server_mid_request(state)
    assert orphans, "the Python stubs outlive a killed tritonserver"
    down = cli(cache, "local", "down")
    assert down.returncode == 0
    assert f"{NAME} is not running (stale state, cleaned); ended {len(orphans)} orphaned process(es)" in down.stdout
    assert "stopped" not in down.stdout
    assert not local.group_members(state.pgid) and not shm_regions(state.shm_prefix)
    assert local.read_state(cache, NAME) is None


def test_up_after_kill_9_cleans_the_crashed_server_then_serves_and_status_sees_a_later_crash(first_up, cache):
    _, old = up(cache)
    assert kill_server_mid_request(old)
    result, new = up(cache)  # no `down` in between
    assert f"the previous server (pid {old.pid}) had died; cleaned its state and ended" in result.stdout + result.stderr
    assert not local.group_members(old.pgid) and not shm_regions(old.shm_prefix)
    generated = cli(cache, "local", "generate", "--max-tokens", "4", "Hello")
    assert generated.returncode == 0, generated.stderr
    assert kill_server_mid_request(new)
    status = cli(cache, "local", "status")
    assert f"{NAME}: not running (stale state, cleaned); ended" in status.stdout
    assert not local.group_members(new.pgid) and not shm_regions(new.shm_prefix)
    assert local.read_state(cache, NAME) is None


def test_up_rebuilds_an_engine_damaged_in_the_cache_instead_of_serving_it(first_up, cache):
    """Weights overwritten in place (same size, same mtime): `up` says why it rebuilds, then serves."""
    from deepseek_contract.integrity import verify_entry

    engine = Path(first_up["state"].engine_dir)
    onnx = engine / "engine" / "model.onnx"
    st = onnx.stat()
    with open(onnx, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(os.urandom(256))
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))
    result, state = up(cache)
    try:
        out = result.stdout + result.stderr
        assert "fails its integrity check: engine/model.onnx has changed since it was built" in out
        assert "discarding it and rebuilding" in out and "export: started" in out
        assert Path(state.engine_dir) == engine and verify_entry(engine) is None
        generated = cli(cache, "local", "generate", "--max-tokens", "4", "Hello")
        assert generated.returncode == 0, generated.stderr
    finally:
        cli(cache, "local", "down")


def test_status_says_a_model_whose_process_died_is_failing_though_triton_still_runs(first_up, cache):
    """Triton keeps a model whose Python process died ready and fails its every request; `local status` asks the
    model itself (the pods' liveness ping) and says what to do."""
    from deepseek_model_repository.serving.processes import children, stub_model

    _, state = up(cache)
    try:
        status = cli(cache, "local", "status")
        assert status.returncode == 0 and f"{NAME} " in status.stdout and " running " in status.stdout, status.stdout
        stubs = {model: pid for pid in children(state.pid) if (model := stub_model(pid))}
        os.kill(stubs[f"{NAME}_stream"], signal.SIGSEGV)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = cli(cache, "local", "status")
            if "failing" in status.stdout:
                break
            time.sleep(0.2)
        assert " failing " in status.stdout, status.stdout
        assert f"{NAME}: its model does not answer" in status.stdout and "is not healthy" in status.stdout
        assert f"run `local down {NAME}` and `local up`" in status.stdout
        # Triton would wait its whole exit timeout (30 s) for the ping that the dead process holds: down does not.
        started = time.monotonic()
        down = cli(cache, "local", "down")
        assert down.returncode == 0 and f"stopped {NAME}" in down.stdout, down.stdout + down.stderr
        assert f"{NAME}: a model process of its server died" in down.stdout + down.stderr
        assert time.monotonic() - started < 15
        assert not local.server_running(state)
    finally:
        cli(cache, "local", "down")
