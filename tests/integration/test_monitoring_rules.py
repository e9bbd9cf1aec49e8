"""The chart's monitoring objects, checked with the real helm and promtool.

* The PrometheusRule's rules pass ``promtool check rules`` and its alerts fire (and stay quiet) on
  synthetic series in ``promtool test rules``.
* The prometheus-adapter rules and the KEDA queries are valid PromQL (promtool parses them) and name
  exactly the metrics the autoscaler renderer puts in the HPA.
* The dashboard is valid JSON whose panels cover the issue's list and name only known metrics.
* ServiceMonitors select the Services the operator and the chart create.

helm comes from .tools/bin/ and promtool from Debian's prometheus package (scripts/install-tools.sh);
without them these tests fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deepseek_operator import autoscaling, naming
from deepseek_operator.api import parse_resource

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "deepseek-operator"
DASHBOARD = CHART / "dashboards" / "deepseek-operator.json"
INSTALL_HINT = "run scripts/install-tools.sh (as root for promtool) and put .tools/bin on PATH"
ALL_ON = [
    "--set", "monitoring.serviceMonitors.enabled=true",
    "--set", "monitoring.prometheusRule.enabled=true",
    "--set", "monitoring.grafanaDashboard.enabled=true",
    "--set", "monitoring.prometheusAdapter.enabled=true",
]

#: The operator's metrics (the operator exports exactly these).
OPERATOR_METRICS = {
    "deepseek_operator_reconciles_total",
    "deepseek_operator_builds_started_total",
    "deepseek_operator_builds_succeeded_total",
    "deepseek_operator_builds_failed_total",
    "deepseek_operator_build_duration_seconds_bucket",
    "deepseek_operator_build_duration_seconds_sum",
    "deepseek_operator_build_duration_seconds_count",
    "deepseek_operator_models",
}
#: The text-generation scheduler's series (models/generate/model.py, on Triton's metrics port; checked against
#: a running Triton in test_prometheus_triton.py).
SCHEDULER_METRICS = {
    "deepseek_scheduler_requests_waiting",
    "deepseek_scheduler_sequences_running",
    "deepseek_scheduler_slots",
    "deepseek_scheduler_kv_cache_utilization",
    "deepseek_scheduler_generated_tokens_total",
    "deepseek_scheduler_engine_steps_total",
    "deepseek_scheduler_sequences_ended_total",
    "deepseek_scheduler_prompt_tokens_total",
    "deepseek_scheduler_prefix_shared_tokens_total",
    *(f"deepseek_scheduler_{h}_{part}" for h in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                                 "queue_time_seconds", "engine_step_seconds")
      for part in ("bucket", "sum", "count")),
}
#: Metrics from neither Triton nor the operator, named on purpose: DCGM exporter's GPU duty cycle (what
#: the HPA scales on) and kube-state-metrics' HPA replica counts (for "saturated at maxReplicas").
EXTERNAL_METRICS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
}


def tool(name: str) -> str:
    local = ROOT / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return found


def helm_template(*args: str) -> list[dict]:
    out = subprocess.run(
        [tool("helm"), "template", "t", str(CHART), "--namespace", "deepseek-system", *args],
        check=True, capture_output=True, text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return helm_template(*ALL_ON)


@pytest.fixture(scope="module")
def rule_file(rendered, tmp_path_factory) -> Path:
    [rule] = by_kind(rendered, "PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def recorded_names(rendered: list[dict]) -> set[str]:
    [rule] = by_kind(rendered, "PrometheusRule")
    return {r["record"] for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r}


# ---------------------------------------------------------------- PromQL metric names
_FUNCTIONS_AND_KEYWORDS = {
    "sum", "avg", "max", "min", "count", "rate", "increase", "irate", "histogram_quantile", "clamp_min",
    "clamp_max", "label_replace", "vector", "avg_over_time", "by", "on", "and", "or", "unless", "without", "ignoring",
    "group_left", "group_right", "bool", "offset", "topk", "bottomk", "abs", "time", "label_values",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (also Grafana's label_values(metric, label))."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*[A-Za-z_]+\s*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()", text):
        word = match.group(1)
        if word not in _FUNCTIONS_AND_KEYWORDS and not re.fullmatch(r"e\d+|Inf|NaN", word):
            names.add(word)
    return names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.5, sum by (le) (rate(deepseek_operator_build_duration_seconds_bucket[1h]))) '
            '/ on (namespace) group_left max(kube_x{a="b{c}"}) and label_values(nv_y{n=~"$ns"}, model) > 1e6')
    assert metric_names(expr) == {"deepseek_operator_build_duration_seconds_bucket", "kube_x", "nv_y"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def rule_exprs(rendered: list[dict]) -> list[str]:
    [rule] = by_kind(rendered, "PrometheusRule")
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def named_metrics(rendered: list[dict]) -> set[str]:
    """Every metric the dashboard and the rules query (recorded series excluded)."""
    names = set()
    for expr in dashboard_exprs() + rule_exprs(rendered):
        names |= metric_names(expr)
    return names - recorded_names(rendered)


def test_rules_and_dashboard_name_only_operator_triton_and_declared_external_metrics(rendered):
    unknown = {n for n in named_metrics(rendered) - OPERATOR_METRICS - EXTERNAL_METRICS - SCHEDULER_METRICS
               if not n.startswith("nv_")}
    assert not unknown, f"metrics that neither Triton nor the operator export: {unknown}"
    # The real Triton names are checked against a running Triton in test_prometheus_triton.py.


# ---------------------------------------------------------------- rules
def test_monitoring_is_off_by_default():
    kinds = {d["kind"] for d in helm_template()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [d for d in by_kind(helm_template(), "ConfigMap") if "adapter" in d["metadata"]["name"]
                or "dashboard" in d["metadata"]["name"]]


def test_promtool_check_rules_passes(rule_file):
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_carry_the_issue_alerts_and_the_queue_ratio_recording_rule(rendered):
    [rule] = by_kind(rendered, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {"DeepSeekTritonP99LatencyHigh", "DeepSeekTritonErrorRateHigh", "DeepSeekGPUSaturatedAtMaxReplicas",
            "DeepSeekEngineBuildFailed", "DeepSeekSchedulerQueueBacklog", "DeepSeekSchedulerSequencesFailing"} <= alerts
    assert {autoscaling.QUEUE_RATIO_RECORD, autoscaling.SCHEDULER_QUEUE_RECORD} <= recorded_names(rendered)


POD = "chat-triton-5d8f7c9b4-x2x7q"
OTHER = "other-triton-7b9c5d-q8w2e"
KEDA_POD = "kchat-triton-6c7d8e9f-a1b2c"


def _alert_test_file(rule_file: Path) -> dict:
    """Synthetic series (15 s apart) and the alerts they must (and must not) raise."""
    chat = f'namespace="ns",pod="{POD}",model="chat"'
    series = {
        # 2000 us/s queued over 4000 us/s computed: ratio 0.5
        f"nv_inference_queue_duration_us{{{chat}}}": "0+30000x40",
        f"nv_inference_compute_infer_duration_us{{{chat}}}": "0+60000x40",
        # an idle pod: ratio 0, not NaN
        f'nv_inference_queue_duration_us{{namespace="ns",pod="{OTHER}",model="other"}}': "0x40",
        f'nv_inference_compute_infer_duration_us{{namespace="ns",pod="{OTHER}",model="other"}}': "0x40",
        # p99 of 3 s on one chat pod, 0.1 s on the other model
        f'nv_inference_request_summary_us{{{chat},quantile="0.99"}}': "3000000x40",
        f'nv_inference_request_summary_us{{namespace="ns",pod="{OTHER}",model="other",quantile="0.99"}}': "100000x40",
        # 10% of chat's requests fail, none of other's
        f"nv_inference_request_success{{{chat}}}": "0+90x40",
        f'nv_inference_request_failure{{{chat},reason="BACKEND"}}': "0+10x40",
        f'nv_inference_request_success{{namespace="ns",pod="{OTHER}",model="other"}}': "0+90x40",
        f'nv_inference_request_failure{{namespace="ns",pod="{OTHER}",model="other",reason="BACKEND"}}': "0x40",
        # chat: GPUs at 95% and its HPA at maxReplicas; other: 95% but room to grow; kchat: KEDA's HPA at max
        f'DCGM_FI_DEV_GPU_UTIL{{namespace="ns",pod="{POD}",gpu="0"}}': "95x40",
        f'DCGM_FI_DEV_GPU_UTIL{{namespace="ns",pod="{OTHER}",gpu="1"}}': "95x40",
        f'DCGM_FI_DEV_GPU_UTIL{{namespace="ns",pod="{KEDA_POD}",gpu="2"}}': "97x40",
        'kube_horizontalpodautoscaler_status_current_replicas{namespace="ns",horizontalpodautoscaler="chat-triton"}': "4x40",
        'kube_horizontalpodautoscaler_spec_max_replicas{namespace="ns",horizontalpodautoscaler="chat-triton"}': "4x40",
        'kube_horizontalpodautoscaler_status_current_replicas{namespace="ns",horizontalpodautoscaler="other-triton"}': "2x40",
        'kube_horizontalpodautoscaler_spec_max_replicas{namespace="ns",horizontalpodautoscaler="other-triton"}': "4x40",
        'kube_horizontalpodautoscaler_status_current_replicas{namespace="ns",horizontalpodautoscaler="keda-hpa-kchat-triton"}': "3x40",
        'kube_horizontalpodautoscaler_spec_max_replicas{namespace="ns",horizontalpodautoscaler="keda-hpa-kchat-triton"}': "3x40",
        # the scheduler of chat: 8 slots, 12 requests waiting (ratio 1.5, over the default alert threshold 1);
        # of other: 8 slots, 2 waiting (0.25)
        f"deepseek_scheduler_requests_waiting{{{chat}}}": "12x40",
        f"deepseek_scheduler_slots{{{chat}}}": "8x40",
        f'deepseek_scheduler_requests_waiting{{namespace="ns",pod="{OTHER}",model="other"}}': "2x40",
        f'deepseek_scheduler_slots{{namespace="ns",pod="{OTHER}",model="other"}}': "8x40",
        # chat's sequences: 80 completed, 12 timed out and 8 failed per 15 s (20%); other's: 99 completed, 1 failed (1%)
        f'deepseek_scheduler_sequences_ended_total{{{chat},outcome="length"}}': "0+60x40",
        f'deepseek_scheduler_sequences_ended_total{{{chat},outcome="stop"}}': "0+20x40",
        f'deepseek_scheduler_sequences_ended_total{{{chat},outcome="timed_out"}}': "0+12x40",
        f'deepseek_scheduler_sequences_ended_total{{{chat},outcome="failed"}}': "0+8x40",
        f'deepseek_scheduler_sequences_ended_total{{namespace="ns",pod="{OTHER}",model="other",outcome="length"}}':
            "0+99x40",
        f'deepseek_scheduler_sequences_ended_total{{namespace="ns",pod="{OTHER}",model="other",outcome="failed"}}':
            "0+1x40",
        # one failed build at minute 2
        "deepseek_operator_builds_failed_total": "0x8 1x32",
        'deepseek_operator_models{phase="Failed"}': "1x40",
        'deepseek_operator_models{phase="Ready"}': "3x40",
    }
    firing = 'ALERTS{alertstate="firing"}'
    return {
        "rule_files": [str(rule_file)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [
                    {
                        "expr": autoscaling.QUEUE_RATIO_RECORD,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": f"{autoscaling.QUEUE_RATIO_RECORD}{{{chat}}}", "value": 0.5},
                            {"labels": f'{autoscaling.QUEUE_RATIO_RECORD}{{namespace="ns",pod="{OTHER}",model="other"}}',
                             "value": 0},
                        ],
                    },
                    {
                        "expr": autoscaling.SCHEDULER_QUEUE_RECORD,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": f"{autoscaling.SCHEDULER_QUEUE_RECORD}{{{chat}}}", "value": 1.5},
                            {"labels": f'{autoscaling.SCHEDULER_QUEUE_RECORD}{{namespace="ns",pod="{OTHER}",model="other"}}',
                             "value": 0.25},
                        ],
                    },
                    {
                        "expr": f"count by (alertname, model, horizontalpodautoscaler) ({firing})",
                        "eval_time": "7m",
                        "exp_samples": [
                            {"labels": '{alertname="DeepSeekTritonP99LatencyHigh",model="chat"}', "value": 1},
                            {"labels": '{alertname="DeepSeekTritonErrorRateHigh",model="chat"}', "value": 1},
                            {"labels": '{alertname="DeepSeekSchedulerQueueBacklog",model="chat"}', "value": 1},
                            {"labels": '{alertname="DeepSeekSchedulerSequencesFailing",model="chat"}', "value": 1},
                            {"labels": '{alertname="DeepSeekGPUSaturatedAtMaxReplicas",horizontalpodautoscaler="chat-triton"}',
                             "value": 1},
                            {"labels": '{alertname="DeepSeekGPUSaturatedAtMaxReplicas",horizontalpodautoscaler="kchat-triton"}',
                             "value": 1},
                            {"labels": '{alertname="DeepSeekEngineBuildFailed"}', "value": 1},
                            {"labels": '{alertname="DeepSeekModelFailed"}', "value": 1},
                        ],
                    },
                    # `for: 5m`: nothing fires after 2 minutes but the build failure (no `for`)
                    {
                        "expr": f"count by (alertname) ({firing})",
                        "eval_time": "2m30s",
                        "exp_samples": [{"labels": '{alertname="DeepSeekEngineBuildFailed"}', "value": 1}],
                    },
                ],
            }
        ],
    }


def test_alerts_fire_on_the_conditions_they_name_and_only_those(rule_file, tmp_path):
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(_alert_test_file(rule_file), sort_keys=False))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- prometheus-adapter and KEDA queries
def _adapter_rules(rendered: list[dict]) -> list[dict]:
    [cm] = [d for d in by_kind(rendered, "ConfigMap") if d["metadata"]["name"].endswith("-adapter-rules")]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def _expand_adapter_template(query: str, rule: dict) -> str:
    """What prometheus-adapter sends for an HPA asking about two pods in namespace ns."""
    overrides = rule["resources"]["overrides"]
    pod_label = next(k for k, v in overrides.items() if v["resource"] == "pod")
    ns_label = next(k for k, v in overrides.items() if v["resource"] == "namespace")
    series = re.match(r"\s*'?([A-Za-z_:][A-Za-z0-9_:]*)", rule["seriesQuery"]).group(1)
    return (query.replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'{ns_label}="ns",{pod_label}=~"{POD}|{OTHER}"')
            .replace("<<.GroupBy>>", pod_label))


def test_adapter_rules_expose_exactly_the_metrics_the_hpa_uses(rendered):
    exposed = {r["name"]["as"] for r in _adapter_rules(rendered)}
    used = set()
    for task in ("text-generation", "text-classification"):
        model = parse_resource({
            "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "metadata": {"name": "chat"},
            "spec": {"model": {"source": "hf://deepseek-ai/x", "task": task},
                     "autoscaling": {"enabled": True, "targetQueueRatio": 0.5}},
        })
        [hpa] = autoscaling.render_autoscaler(model, {"apiVersion": "v1", "kind": "X", "name": "chat", "uid": "u"})
        used |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert used == exposed == {autoscaling.GPU_UTIL_METRIC, autoscaling.QUEUE_RATIO_METRIC,
                               autoscaling.SCHEDULER_QUEUE_METRIC}
    for rule in _adapter_rules(rendered):
        assert re.fullmatch(rule["name"]["matches"], re.match(r"(\w+)", rule["seriesQuery"]).group(1))
        assert {v["resource"] for v in rule["resources"]["overrides"].values()} == {"namespace", "pod"}


def test_adapter_and_keda_queries_are_valid_promql(rendered, tmp_path):
    """promtool parses each query as a recording rule's expression."""
    model = parse_resource({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": {"source": "hf://deepseek-ai/x"}},
    })
    classifier = model.model_copy(deep=True)
    classifier.spec.model.task = "text-classification"
    queries = [_expand_adapter_template(r["metricsQuery"], r) for r in _adapter_rules(rendered)]
    queries += [autoscaling.gpu_utilization_query(model), autoscaling.queue_ratio_query(model),
                autoscaling.queue_ratio_query(classifier)]
    rules = {"groups": [{"name": "queries", "rules": [{"record": f"q:{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_adapter_rules_follow_configured_dcgm_labels_and_namespace():
    docs = helm_template(*ALL_ON, "--set", "monitoring.dcgm.podLabel=exported_pod",
                         "--set", "monitoring.dcgm.namespaceLabel=exported_namespace",
                         "--set", "monitoring.prometheusAdapter.namespace=monitoring")
    [cm] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-adapter-rules")]
    assert cm["metadata"]["namespace"] == "monitoring"
    gpu = yaml.safe_load(cm["data"]["config.yaml"])["rules"][0]
    assert gpu["resources"]["overrides"] == {"exported_namespace": {"resource": "namespace"},
                                             "exported_pod": {"resource": "pod"}}
    assert 'exported_pod!=""' in gpu["seriesQuery"]


def test_operator_metric_names_are_what_the_operator_registry_exports():
    from prometheus_client import generate_latest

    from deepseek_operator.metrics import REGISTRY

    exported = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if not match or match.group(1).endswith("_created"):
            continue
        name, kind = match.groups()
        exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    assert exported == OPERATOR_METRICS


# ---------------------------------------------------------------- ServiceMonitors
def test_triton_service_monitor_selects_the_rendered_triton_service(rendered):
    from deepseek_operator.render import render_service

    model = parse_resource({
        "apiVersion": "deepseek.ai/v1alpha1", "kind": "DeepSeekModel", "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": {"source": "hf://deepseek-ai/x"}},
    })
    service = render_service(model)
    [sm] = [d for d in by_kind(rendered, "ServiceMonitor") if d["metadata"]["name"].endswith("-triton")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports.get("metrics") == 8002
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


def test_triton_service_monitor_selects_the_operators_triton_services(rendered):
    [sm] = [d for d in by_kind(rendered, "ServiceMonitor") if d["metadata"]["name"].endswith("-triton")]
    triton_labels = naming.standard_labels("chat", "triton")
    assert sm["spec"]["selector"]["matchLabels"].items() <= triton_labels.items()
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


def test_triton_service_monitor_limits_to_watched_namespaces():
    docs = helm_template(*ALL_ON, "--set", "watchNamespaces={a,b}")
    [sm] = [d for d in by_kind(docs, "ServiceMonitor") if d["metadata"]["name"].endswith("-triton")]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}
    docs = helm_template(*ALL_ON, "--set", "watchNamespaces={a,b}", "--set", "monitoring.serviceMonitors.namespaces={c}")
    [sm] = [d for d in by_kind(docs, "ServiceMonitor") if d["metadata"]["name"].endswith("-triton")]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["c"]}


def test_operator_service_monitor_selects_the_metrics_service(rendered):
    [sm] = [d for d in by_kind(rendered, "ServiceMonitor") if d["metadata"]["name"].endswith("-operator")]
    [svc] = [d for d in by_kind(rendered, "Service") if d["metadata"]["name"].endswith("-metrics")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    assert "metrics" in [p["name"] for p in svc["spec"]["ports"]]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]


def test_monitoring_labels_reach_every_monitoring_object():
    docs = helm_template(*ALL_ON, "--set", "monitoring.labels.release=kube-prometheus-stack")
    monitoring = [d for d in docs if d["kind"] in {"ServiceMonitor", "PrometheusRule"}
                  or d["metadata"]["name"].endswith(("-adapter-rules", "-dashboard"))]
    assert len(monitoring) == 5
    assert all(d["metadata"]["labels"]["release"] == "kube-prometheus-stack" for d in monitoring)


# ---------------------------------------------------------------- dashboard
def test_dashboard_configmap_carries_valid_json_for_grafanas_sidecar(rendered):
    [cm] = [d for d in by_kind(rendered, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    [(key, text)] = cm["data"].items()
    assert key.endswith(".json")
    dash = json.loads(text)
    assert dash == json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_dashboard_covers_rps_latency_queue_gpu_replicas_and_builds():
    dash = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    joined = " ".join(by_title.values())
    assert "rate(nv_inference_request_success" in joined  # requests per second
    assert 'quantile="0.5"' in joined and 'quantile="0.99"' in joined  # p50 / p99
    assert "nv_inference_queue_duration_us" in joined  # queue time
    for series in ("deepseek_scheduler_requests_waiting", "deepseek_scheduler_sequences_running",
                   "deepseek_scheduler_kv_cache_utilization", "deepseek_scheduler_time_to_first_token_seconds_bucket",
                   "deepseek_scheduler_inter_token_latency_seconds_bucket", "deepseek_scheduler_generated_tokens_total",
                   "deepseek_scheduler_engine_step_seconds_sum", "deepseek_scheduler_engine_step_seconds_bucket",
                   "deepseek_scheduler_sequences_ended_total", "deepseek_scheduler_queue_time_seconds_bucket",
                   "deepseek_scheduler_prefix_shared_tokens_total",
                   autoscaling.SCHEDULER_QUEUE_RECORD):
        assert series in joined, series
    assert autoscaling.GPU_UTIL_METRIC in joined  # GPU utilization
    assert any("replicas" in t.lower() for t in by_title)  # replicas
    assert "deepseek_operator_build_duration_seconds_bucket" in joined  # build durations
    for title, exprs in by_title.items():
        assert exprs.strip(), f"panel {title!r} has no query"


def test_dashboard_and_rule_queries_parse_as_promql(rendered, tmp_path):
    grafana_vars = {"$__rate_interval": "1m", "$namespace": ".*", "$model": ".+", "${datasource}": ""}
    queries = []
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            continue
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        queries.append(expr)
    rules = {"groups": [{"name": "dash", "rules": [{"record": f"d:{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dash.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_lint_passes_with_monitoring_on():
    result = subprocess.run([tool("helm"), "lint", str(CHART), *ALL_ON], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

