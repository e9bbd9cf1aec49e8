"""A real Prometheus scrapes a real Triton under load and evaluates the chart's rules.

* tritonserver (the local mode's binary from nvidia-pytriton, found and started with ``local``'s own
  helpers) serves a Python-backend model that sleeps 20 ms per batch of up to 4, with one instance, so
  concurrent requests queue. It runs with ``--metrics-config=summary_latencies=true``, the flag the
  dashboard's p50/p99 panels and the latency alert need.
* Debian's ``prometheus`` on loopback scrapes it every second with the target labels a ServiceMonitor
  gives (namespace, pod) and evaluates the PrometheusRule rendered by ``helm template``.
* Beside it, the same Triton serves the tiny text-generation model (engine built by the builder) with 2
  KV-cache slots: its scheduler publishes the ``deepseek_scheduler_*`` series on the same port.
* The recorded queue-to-compute ratio (Triton's queue) and the recorded scheduler queue ratio (requests
  waiting per slot) are ~0 idle, rise under a bounded load (16 + 8 clients, 8 s), and fall back once the
  load stops. Every Triton and scheduler metric the dashboard and the rules name is in Triton's real
  /metrics, and every such panel's query returns data.

Fails (not skips) without prometheus/promtool/helm: run scripts/install-tools.sh.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from deepseek_local import local
from deepseek_model_repository import write_repository as write_model_repository
from deepseek_model_repository.client import GenerationClient
from deepseek_operator import autoscaling
from triton_harness import build, tiny_resource
from test_monitoring_rules import (
    EXTERNAL_METRICS,
    OPERATOR_METRICS,
    SCHEDULER_METRICS,
    by_kind,
    dashboard_exprs,
    helm_template,
    metric_names,
    named_metrics,
    recorded_names,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

MODEL = "sleepy"
CHAT = "chat"
CHAT_CLIENTS = 8
NAMESPACE = "serving"
POD = "sleepy-triton-5d8f7c9b4-x2x7q"
CLIENTS = 16
LOAD_SECONDS = 8.0
RATE_WINDOW = "8s"

SLEEPY_MODEL_PY = '''
"""Echo the input after sleeping 20 ms per batch, so that concurrent requests queue."""

import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        """One batch: sleep, then echo each request's input."""
        time.sleep(0.02)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())])
            for r in requests
        ]
'''


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def need(binary: str) -> str:
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"{binary} is not installed: run scripts/install-tools.sh (as root; it installs Debian's "
                    f"prometheus package)")
    return found


def write_repository(root: Path) -> Path:
    repo = root / "repository"
    (repo / MODEL / "1").mkdir(parents=True)
    config = json_format.ParseDict(
        {
            "name": MODEL,
            "backend": "python",
            "max_batch_size": 4,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
            "dynamic_batching": {"max_queue_delay_microseconds": 1000},
            "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        },
        model_config_pb2.ModelConfig(),
    )
    (repo / MODEL / "config.pbtxt").write_text(text_format.MessageToString(config))
    (repo / MODEL / "1" / "model.py").write_text(SLEEPY_MODEL_PY)
    return repo


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """tritonserver on loopback with latency summaries on; yields (http_port, metrics_port)."""
    root = tmp_path_factory.mktemp("triton")
    repo = write_repository(root)
    chat = tiny_resource(root / "cache", CHAT, spec_overrides={
        "engine": {"maxBatchSize": 2}, "serving": {"dynamicBatching": {"preferredBatchSizes": [2]}}})
    write_model_repository(build(chat, root / "cache"), repo, CHAT, runtime="local", max_queue_delay_us=0)
    install = local.find_triton()
    backends = local.prepare_backends(install, root / "backends")
    http_port, grpc_port, metrics_port = local.free_port(), local.free_port(), local.free_port()
    argv = [
        str(install.binary), f"--model-repository={repo}", f"--backend-directory={backends}",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        "--metrics-config=summary_latencies=true", "--exit-timeout-secs=5", "--log-verbose=0",
    ]
    log = root / "triton.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=local.server_env(install), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        local.wait_ready(proc.pid, http_port, [MODEL, CHAT, f"{CHAT}_stream"], log, timeout=60)
        yield http_port, metrics_port, grpc_port
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def rendered():
    return helm_template(
        "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.prometheusRule.interval=1s",
        "--set", f"monitoring.prometheusRule.rateWindow={RATE_WINDOW}",
        "--set", "monitoring.grafanaDashboard.enabled=true",
    )


@pytest.fixture(scope="module")
def prometheus(triton, rendered, tmp_path_factory):
    """Prometheus on loopback scraping Triton every second and evaluating the chart's rules; yields its URL."""
    need("promtool")
    binary = need("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    [rule] = by_kind(rendered, "PrometheusRule")
    (root / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    _, metrics_port, _ = triton
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(root / "rules.yml")],
        "scrape_configs": [{
            "job_name": "triton",
            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"],
                                # the target labels a ServiceMonitor gives a pod's endpoint
                                "labels": {"namespace": NAMESPACE, "pod": POD}}],
        }],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = local.free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "prometheus.log", "wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if query(url, 'up{job="triton"} == 1'):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prometheus did not scrape Triton:\n" + (root / "prometheus.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def query(url: str, promql: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def ratio(url: str, record: str = autoscaling.QUEUE_RATIO_RECORD, model: str = MODEL) -> float | None:
    result = query(url, f'{record}{{model="{model}"}}')
    return float(result[0]["value"][1]) if result else None


def scheduler_ratio(url: str) -> float | None:
    return ratio(url, autoscaling.SCHEDULER_QUEUE_RECORD, CHAT)


def keda_model(task: str):
    """A DeepSeekModel whose Deployment's pods the scraped target's pod label (``POD``) matches."""
    from deepseek_operator.api import parse_resource

    return parse_resource({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel",
        "metadata": {"name": MODEL, "namespace": NAMESPACE},
        "spec": {"model": {"source": "hf://deepseek-ai/x", "task": task},
                 "autoscaling": {"enabled": True}},
    })


def keda_reader(task: str):
    """Reads the queue signal a ScaledObject's Prometheus trigger gives KEDA for a model of ``task``: the same
    PromQL the renderer writes (``autoscaling.queue_ratio_query``), evaluated on the scraped series."""
    promql = autoscaling.queue_ratio_query(keda_model(task), window=RATE_WINDOW)

    def read(url: str) -> float | None:
        result = query(url, promql)
        return float(result[0]["value"][1]) if result else None
    return read


def run_chat_load(grpc_port: int, seconds: float, clients: int) -> int:
    """``clients`` closed-loop text-generation clients on 2 slots, so requests wait; returns completions."""
    deadline = time.monotonic() + seconds
    done = [0] * clients

    def loop(i: int) -> None:
        client = GenerationClient(f"127.0.0.1:{grpc_port}", CHAT)
        try:
            while time.monotonic() < deadline and done[i] < 500:
                assert client.generate("the of and", max_tokens=16)
                done[i] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def run_load(http_port: int, seconds: float, clients: int) -> int:
    """``clients`` closed-loop clients for ``seconds`` (bounded in time and count); returns requests sent."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", concurrency=clients)
    deadline = time.monotonic() + seconds
    sent = [0] * clients

    def loop(i: int) -> None:
        data = np.full((1, 4), i, dtype=np.float32)
        while time.monotonic() < deadline and sent[i] < 2000:
            tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_data_from_numpy(data)
            result = client.infer(MODEL, [tensor])
            assert np.array_equal(result.as_numpy("OUTPUT0"), data)
            sent[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return sum(sent)


def wait_for(url: str, predicate, timeout: float, read=ratio) -> float | None:
    deadline = time.monotonic() + timeout
    value = read(url)
    while not predicate(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read(url)
    return value


@pytest.fixture(scope="module")
def load_phases(triton, prometheus):
    """Idle, loaded and after-load values of the recorded ratios, and the Triton metric names seen."""
    http_port, metrics_port, grpc_port = triton
    idle = wait_for(prometheus, lambda v: v is not None, timeout=15)
    scheduler_idle = wait_for(prometheus, lambda v: v is not None, timeout=15, read=scheduler_ratio)
    peaks: list[float] = []
    scheduler_peaks: list[float] = []
    keda = {task: {"read": keda_reader(task), "peaks": []} for task in ("text-classification", "text-generation")}
    for phases in keda.values():
        phases["idle"] = wait_for(prometheus, lambda v: v is not None, timeout=15, read=phases["read"])
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for read, seen in ((ratio, peaks), (scheduler_ratio, scheduler_peaks),
                               *((k["read"], k["peaks"]) for k in keda.values())):
                value = read(prometheus)
                if value is not None:
                    seen.append(value)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    chat = threading.Thread(target=lambda: completions.append(run_chat_load(grpc_port, LOAD_SECONDS, CHAT_CLIENTS)))
    completions: list[int] = []
    chat.start()
    sent = run_load(http_port, LOAD_SECONDS, CLIENTS)
    chat.join()
    time.sleep(2)  # one more scrape and evaluation of the last loaded seconds
    stop.set()
    watcher.join()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        metrics_text = r.read().decode()
    after = wait_for(prometheus, lambda v: v is not None and v < 0.05, timeout=20)
    scheduler_after = wait_for(prometheus, lambda v: v is not None and v < 0.05, timeout=20, read=scheduler_ratio)
    for phases in keda.values():
        phases["after"] = wait_for(prometheus, lambda v: v is not None and v < 0.05, timeout=20, read=phases["read"])
    return {"idle": idle, "peak": max(peaks or [0.0]), "after": after, "sent": sent, "metrics": metrics_text,
            "keda": {task: {"idle": k["idle"], "peak": max(k["peaks"] or [0.0]), "after": k["after"]}
                     for task, k in keda.items()},
            "scheduler": {"idle": scheduler_idle, "peak": max(scheduler_peaks or [0.0]), "after": scheduler_after,
                          "completions": sum(completions)}}


def test_queue_ratio_rises_under_load_and_falls_after(load_phases):
    idle, peak, after = load_phases["idle"], load_phases["peak"], load_phases["after"]
    assert load_phases["sent"] > 100
    assert idle is not None and idle < 0.05, f"idle ratio {idle}"
    # 16 clients on one instance taking 4 per batch: most of a request's time is spent queued.
    assert peak > 0.5, f"peak ratio under load {peak}"
    assert after is not None and after < 0.05 < peak, f"ratio after the load {after} (peak {peak})"


def test_scheduler_queue_ratio_rises_under_load_and_falls_after(load_phases):
    """8 generation clients on 2 KV-cache slots: requests wait in the scheduler, which Triton's queue never sees."""
    phases = load_phases["scheduler"]
    assert phases["completions"] > 10
    assert phases["idle"] is not None and phases["idle"] < 0.05, phases
    assert phases["peak"] > 0.5, phases
    assert phases["after"] is not None and phases["after"] < 0.05 < phases["peak"], phases


@pytest.mark.parametrize("task", ["text-classification", "text-generation"])
def test_the_keda_queue_query_rises_under_load_and_falls_after(load_phases, task):
    """The PromQL a ScaledObject's queue trigger carries, evaluated on the real scraped series (not a recording rule):
    Triton's queue time over compute time for classification, requests waiting per slot for text generation."""
    phases = load_phases["keda"][task]
    assert phases["idle"] is not None and phases["idle"] < 0.05, phases
    assert phases["peak"] > 0.5, phases
    assert phases["after"] is not None and phases["after"] < 0.05 < phases["peak"], phases


def triton_metric_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


def test_every_metric_the_dashboard_and_rules_name_is_really_exported(load_phases, rendered):
    triton_names = triton_metric_names(load_phases["metrics"])
    assert {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_request_summary_us"} <= triton_names
    assert SCHEDULER_METRICS <= triton_names, sorted(SCHEDULER_METRICS - triton_names)
    unknown = named_metrics(rendered) - triton_names - OPERATOR_METRICS - EXTERNAL_METRICS
    assert not unknown, f"named in the dashboard or rules but exported by nobody: {sorted(unknown)}"


def test_triton_panels_return_data_from_real_prometheus(load_phases, prometheus, rendered):
    recorded = recorded_names(rendered)
    grafana = {"$__rate_interval": "30s", "$namespace": NAMESPACE, "$model": f"{MODEL}|{CHAT}"}
    checked = 0
    for expr in dashboard_exprs():
        names = metric_names(expr)
        if expr.startswith("label_values(") or not names or not all(
                n.startswith(("nv_", "deepseek_scheduler_")) or n in recorded for n in names):
            continue
        if "nv_inference_request_failure" in names and "reason" in expr:
            continue  # no request failed: Triton exports the series at 0, which a rate keeps (checked below)
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert query(prometheus, expr), f"no data for dashboard query {expr}"
        checked += 1
    assert checked >= 12
    assert query(prometheus, f'sum(rate(nv_inference_request_failure{{model="{MODEL}"}}[30s]))')
