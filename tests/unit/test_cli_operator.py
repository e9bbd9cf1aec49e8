"""``deepseek-operator render`` and ``crd`` as a user runs them: a real process, its output and exit status."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import kubernetes_validate
import yaml


def run_command(command: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``deepseek-operator COMMAND ARGS`` in a fresh interpreter, through the console script's entry point."""
    code = "from deepseek_cli import main; main(prog_name='deepseek-operator')"
    return subprocess.run([sys.executable, "-c", code, command, *args], capture_output=True, text=True, timeout=60,
                          env=env)


def write(tmp_path, text: str):
    path = tmp_path / "model.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


VALID = """
    apiVersion: deepseek.ai/v1alpha1
    kind: DeepSeekModel
    metadata: {name: r1-distill, namespace: models}
    spec:
      model: {source: "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", revision: main}
      serving: {replicas: 2}
      autoscaling: {enabled: true, minReplicas: 2, maxReplicas: 4}
"""


def test_render_prints_valid_children_as_multi_document_yaml(tmp_path):
    result = run_command("render", "-f", write(tmp_path, VALID))
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == [
        "PersistentVolumeClaim", "Job", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.35.0", strict=True)
    deployment = docs[2]
    assert "replicas" not in deployment["spec"]


def test_render_uses_the_images_from_the_environment(tmp_path):
    import os

    env = {**os.environ, "DEEPSEEK_BUILDER_IMAGE": "reg.example/builder:7", "DEEPSEEK_OPERATOR_IMAGE": "reg.example/op:7"}
    result = run_command("render", "-f", write(tmp_path, VALID), env=env)
    docs = list(yaml.safe_load_all(result.stdout))
    assert docs[1]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/builder:7"
    assert docs[2]["spec"]["template"]["spec"]["initContainers"][0]["image"] == "reg.example/op:7"


def test_render_refuses_an_invalid_model_naming_the_field_without_traceback(tmp_path):
    path = write(tmp_path, """
        apiVersion: deepseek.ai/v1alpha1
        kind: DeepSeekModel
        metadata: {name: r1}
        spec:
          model: {source: "hf://a/b"}
          engine: {maxBatchSize: 0, backend: tensorrt}
          serving: {gpusPerReplica: 0}
    """)
    result = run_command("render", "-f", path)
    assert result.returncode != 0
    assert "spec.engine.maxBatchSize" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_render_of_a_missing_file_says_so(tmp_path):
    result = run_command("render", "-f", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0
    assert "absent.yaml" in result.stderr and "Traceback" not in result.stderr


def test_crd_prints_the_generated_crd():
    from deepseek_operator.crd import render_crd_yaml

    result = run_command("crd")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_crd_yaml()
    crd = yaml.safe_load(result.stdout)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "deepseek.ai"


def test_run_rejects_a_malformed_liveness_address():
    result = run_command("run", "--liveness", "nonsense")
    assert result.returncode != 0
    assert "--liveness" in result.stderr and "Traceback" not in result.stderr
