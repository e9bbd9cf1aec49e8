"""``deepseek-operator run`` as a process: kubeconfig login, liveness probe, Prometheus metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml

from deepseek_operator import naming
from kube_harness import condition

pytestmark = [pytest.mark.timeout(60)]

SPEC = {
    "model": {"source": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": "abc123"},
    "engine": {"backend": "onnxruntime", "precision": "fp32"},
    "serving": {"gpusPerReplica": 0},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as rsp:
        return rsp.read().decode()


async def test_run_serves_liveness_and_metrics_and_reconciles(cluster, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": cluster.url}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
    }))
    metrics_port, liveness_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "DEEPSEEK_BUILDER_IMAGE": "registry.example/builder:run",
           "WATCH_NAMESPACES": ""}
    code = "from deepseek_cli import main; main(prog_name='deepseek-operator')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "--all-namespaces", "--metrics-port", str(metrics_port),
         "--liveness", f"127.0.0.1:{liveness_port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        await cluster.wait_watching(timeout=30)
        assert cluster.watched_namespaces() == {None}  # --all-namespaces: one cluster-wide watch
        await cluster.create_model("r1", SPEC)
        obj = await cluster.wait_phase("r1", "Building")
        assert condition(obj, "EngineBuilt")["reason"] == "BuildRunning"
        (job,) = await cluster.list("Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/builder:run"

        health = await asyncio.to_thread(fetch, f"http://127.0.0.1:{liveness_port}/healthz")
        assert health  # kopf's liveness endpoint answers 200 with its probe results
        text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
        assert "deepseek_operator_builds_started_total 1.0" in text
        assert 'deepseek_operator_reconciles_total{result="success"}' in text
        assert 'deepseek_operator_models{phase="Building"} 1.0' in text
        for name in ("deepseek_operator_builds_succeeded_total", "deepseek_operator_builds_failed_total",
                     "deepseek_operator_build_duration_seconds_bucket"):
            assert name in text

        await cluster.finish_job(job["metadata"]["name"], succeeded=True)
        await cluster.wait_phase("r1", "Deploying")
        text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
        assert "deepseek_operator_builds_succeeded_total 1.0" in text
        assert "deepseek_operator_build_duration_seconds_count 1.0" in text
        assert await cluster.get("Deployment", naming.triton_name("r1")) is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
