"""The Helm chart, the plain install and the operator image's sources, checked with the real helm and kubectl.

Every rendered object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
objects whose kinds come from other projects' CRDs have no schema there and are skipped by kind.
helm and kubectl come from .tools/bin/ (scripts/install-tools.sh) or PATH; without them the tests fail.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "deepseek-operator"
MANIFESTS = ROOT / "manifests"
NAMESPACE = "deepseek-system"

#: Kinds defined by other projects' CRDs: kubernetes-validate has no schema for them.
CRD_TYPED_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
K8S_VERSION = kubernetes_validate.latest_version()

#: The operator's rights on the resources it manages (least privilege: exactly these verbs).
WORKLOAD_RULES = {
    ("deepseek.ai", "deepseekmodels"): {"get", "list", "watch", "patch", "update"},
    ("deepseek.ai", "deepseekmodels/status"): {"get", "patch", "update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch"},
    ("", "events"): {"create", "patch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "list", "watch", "create", "patch", "delete"},
}
KEDA_RULE = {("keda.sh", "scaledobjects"): {"get", "list", "watch", "create", "patch", "delete"}}
DISCOVERY_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def _generate_module():
    spec = importlib.util.spec_from_file_location("deepseek_generate", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generate_module()


def tool(name: str) -> str:
    try:
        return generate.find_tool(name)
    except generate.ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=60)


def template(*values: str, include_crds: bool = False) -> list[dict]:
    """``helm template`` of the chart with ``--set`` values, as a list of objects."""
    args = [tool("helm"), "template", "deepseek-operator", str(CHART), "--namespace", NAMESPACE]
    for value in values:
        args += ["--set", value]
    if include_crds:
        args.append("--include-crds")
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    """A Role's rules flattened to {(apiGroup, resource): verbs}."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def operator_container(objects: list[dict]) -> dict:
    (deployment,) = of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


VALUE_SETS = {
    "defaults": (),
    "watched-namespaces": ("watchNamespaces={team-a,team-b}",),
    "metrics-off": ("metrics.enabled=false",),
    "keda": ("autoscaling.keda.enabled=true",),
    "monitoring-on": (
        "monitoring.serviceMonitors.enabled=true",
        "monitoring.prometheusRule.enabled=true",
        "monitoring.grafanaDashboard.enabled=true",
        "monitoring.prometheusAdapter.enabled=true",
    ),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: template(*values, include_crds=True) for name, values in VALUE_SETS.items()}


def test_helm_lint_passes_strict():
    proc = run(tool("helm"), "lint", str(CHART), "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered, case):
    objects = rendered[case]
    assert of_kind(objects, "Deployment"), "the chart rendered no operator Deployment"
    checked = set()
    for obj in objects:
        if obj["kind"] in CRD_TYPED_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked.add(obj["kind"])
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= checked


def test_crd_validates_as_an_apiextensions_v1_crd():
    crd = yaml.safe_load((MANIFESTS / "crd.yaml").read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards(rendered, case):
    for obj in rendered[case]:
        if obj["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in obj["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), f"{obj['kind']} {obj['metadata']['name']}: '*' in {field}"


def test_all_namespaces_uses_a_clusterrole_with_exactly_the_workload_rules(rendered):
    objects = rendered["defaults"]
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
    roles = {r["metadata"]["name"]: rules_of(r) for r in of_kind(objects, "ClusterRole")}
    assert roles == {"deepseek-operator": WORKLOAD_RULES, "deepseek-operator-discovery": DISCOVERY_RULES}
    bindings = of_kind(objects, "ClusterRoleBinding")
    assert {b["roleRef"]["name"] for b in bindings} == set(roles)
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "deepseek-operator", "namespace": NAMESPACE}
        ]
    container = operator_container(objects)
    assert "--all-namespaces" in container["args"]
    assert {"name": "WATCH_NAMESPACES", "value": ""} in container["env"]


def test_watched_namespaces_get_a_role_and_binding_each_and_no_cluster_wide_workload_rights(rendered):
    objects = rendered["watched-namespaces"]
    roles = of_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_of(role) == WORKLOAD_RULES
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deepseek-operator"}
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # Cluster-wide, only kopf's read-only discovery of CRDs and namespaces remains.
    assert [rules_of(r) for r in of_kind(objects, "ClusterRole")] == [DISCOVERY_RULES]
    container = operator_container(objects)
    assert "--all-namespaces" not in container["args"]
    assert [a for a in container["args"] if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert {"name": "WATCH_NAMESPACES", "value": "team-a,team-b"} in container["env"]


def test_keda_rights_only_when_enabled(rendered):
    (default_role,) = [r for r in of_kind(rendered["defaults"], "ClusterRole") if "discovery" not in r["metadata"]["name"]]
    (keda_role,) = [r for r in of_kind(rendered["keda"], "ClusterRole") if "discovery" not in r["metadata"]["name"]]
    assert ("keda.sh", "scaledobjects") not in rules_of(default_role)
    assert rules_of(keda_role) == {**WORKLOAD_RULES, **KEDA_RULE}


def test_operator_container_runs_the_operator_with_probes_metrics_and_its_images(rendered):
    container = operator_container(rendered["defaults"])
    assert container["image"] == "ghcr.io/deepseek-operator/deepseek-operator:0.1.0"
    assert container["args"][0] == "run"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert "--metrics-port=9090" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DEEPSEEK_BUILDER_IMAGE"] == "ghcr.io/deepseek-operator/deepseek-builder:0.1.0"
    assert env["DEEPSEEK_OPERATOR_IMAGE"] == container["image"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    (service,) = of_kind(rendered["defaults"], "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    (deployment,) = of_kind(rendered["defaults"], "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_metrics_off_drops_the_service_port_and_flag(rendered):
    objects = rendered["metrics-off"]
    assert not of_kind(objects, "Service")
    container = operator_container(objects)
    assert not any(a.startswith("--metrics-port") for a in container["args"])
    assert [p["name"] for p in container["ports"]] == ["health"]


def test_operator_pod_meets_the_restricted_pod_security_standard(rendered):
    (deployment,) = of_kind(rendered["defaults"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_values_schema_refuses_unknown_and_mistyped_values():
    helm = tool("helm")
    typo = run(helm, "template", "x", str(CHART), "--set", "watchNamespace=team-a")
    assert typo.returncode != 0 and "watchNamespace" in typo.stderr
    wrong = run(helm, "template", "x", str(CHART), "--set", "metrics.port=metrics")
    assert wrong.returncode != 0 and "/metrics/port" in wrong.stderr
    bad_ns = run(helm, "template", "x", str(CHART), "--set", "watchNamespaces={Team_A}")
    assert bad_ns.returncode != 0 and "watchNamespaces" in bad_ns.stderr


def test_notes_say_how_to_apply_an_example_watch_it_and_query_triton():
    proc = run(tool("helm"), "install", "deepseek-operator", str(CHART), "--namespace", NAMESPACE,
               "--dry-run=client", "--set", "watchNamespaces={team-a}")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl get dsm -w" in notes
    assert "DeepSeekModels in: team-a" in notes
    assert "/v2/models/<name>/infer" in notes
    for example in re.findall(r"manifests/examples/[\w.-]+\.yaml", notes):
        assert (ROOT / example).is_file(), f"NOTES.txt names {example}, which does not exist"


def test_kubectl_kustomize_builds_the_plain_install():
    proc = run(tool("kubectl"), "kustomize", str(MANIFESTS))
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    install = [d for d in yaml.safe_load_all((MANIFESTS / "install.yaml").read_text()) if d]
    key = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, built)) == sorted(map(key, install))
    kinds = {o["kind"] for o in built}
    assert {"Namespace", "CustomResourceDefinition", "Deployment", "ClusterRole", "ServiceAccount"} <= kinds
    for obj in built:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _dockerfile_copied_sources() -> list[str]:
    """The source paths the operator Dockerfile's build stage copies from the context."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    return sources


def test_dockerfile_sources_build_the_operator_wheel_with_its_entrypoint(tmp_path):
    """What the image's build stage runs, on exactly the files it copies (offline: no build isolation)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["deepseek-operator"\]$', dockerfile, re.M)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must run as a non-root user"
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "lib", "bdist.*")
    for source in _dockerfile_copied_sources():
        src = ROOT / source.rstrip("/")
        if src.is_dir():
            shutil.copytree(src, context / src.name, ignore=ignore)
        else:
            shutil.copy2(src, context / src.name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("deepseek_operator-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "deepseek-operator = deepseek_cli:main" in entry_points
    for module in ("deepseek_cli/__init__.py", "deepseek_contract/engine.py", "deepseek_builder/__init__.py", "deepseek_model_repository/__init__.py"):
        assert module in names
    # setuptools' scratch must not land in the wheel through the builder package's folder (build/).
    assert not [n for n in names if n.startswith("deepseek_builder/lib/") or "bdist." in n]
