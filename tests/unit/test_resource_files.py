"""Every malformed DeepSeekModel file gets one line naming the file or the field, from `render` and `local up`."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from deepseek_cli import main

GOOD = ("apiVersion: deepseek.ai/v1alpha1\nkind: DeepSeekModel\nmetadata: {name: r1}\n"
        "spec:\n  model: {source: hf://org/model}\n  engine: {backend: onnxruntime, precision: fp32}\n"
        "  serving: {gpusPerReplica: 0}\n")

# (file content, words the one line must hold)
CASES = {
    "metadata-string": (GOOD.replace("metadata: {name: r1}", "metadata: bad-test"), "metadata: must be a mapping"),
    "name-number": (GOOD.replace("{name: r1}", "{name: 123}"), "metadata.name: must be a string"),
    "name-missing": (GOOD.replace("{name: r1}", "{namespace: models}"), "metadata.name: required"),
    "name-invalid": (GOOD.replace("{name: r1}", "{name: Bad_Name}"), "metadata.name"),
    "namespace-number": (GOOD.replace("{name: r1}", "{name: r1, namespace: 7}"), "metadata.namespace"),
    "labels-list": (GOOD.replace("{name: r1}", "{name: r1, labels: [a]}"), "metadata.labels"),
    "non-utf8": (b"apiVersion: deepseek.ai/v1alpha1\nkind: DeepSeekModel\nmetadata: {name: \xff\xfe}\n",
                 "not UTF-8 text"),
    "top-level-list": ("- " + GOOD.replace("\n", "\n  "), "holds a list"),
    "misspelled-kind": (GOOD.replace("kind: DeepSeekModel", "kind: DeepseekModel"),
                        "kind: must be DeepSeekModel, got 'DeepseekModel'"),
    "wrong-api-version": (GOOD.replace("v1alpha1", "v1"), "apiVersion: must be deepseek.ai/v1alpha1"),
    "scalar": ("just a sentence\n", "must be a mapping"),
    "empty": ("", "is empty"),
    "comments-only": ("# nothing here\n", "is empty"),
    "bad-yaml": ("apiVersion: [unclosed\n", "not valid YAML at line"),
    "tab-indent": ("spec:\n\tmodel: x\n", "not valid YAML"),
    "spec-missing": (GOOD.split("spec:")[0], "spec: required"),
    "spec-string": (GOOD.split("spec:")[0] + "spec: hello\n", "spec: must be a mapping"),
    "source-scheme": (GOOD.replace("hf://org/model", "ftp://host/model"), "spec.model.source"),
    "source-credentials": (GOOD.replace("hf://org/model", "s3://AKIAKEY:SECRETVALUE@bucket/m"), "credentialsSecret"),
    "unknown-field": (GOOD.replace("gpusPerReplica: 0", "gpusPerReplica: 0, replica: 2"), "spec.serving.replica"),
    "other-kinds-only": ("apiVersion: v1\nkind: Secret\n---\napiVersion: v1\nkind: ConfigMap\n",
                         "holds no DeepSeekModel document (kinds found: ConfigMap, Secret)"),
    "huge": ("# " + "x" * (2 << 20) + "\n" + GOOD, "larger than"),
}


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_says_what_is_wrong_in_one_line(tmp_path, case):
    content, words = CASES[case]
    path = write(tmp_path, case, content)
    result = CliRunner().invoke(main, ["render", "-f", path])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = one_line(result.output)
    assert words in line and path in line, line
    assert "SECRETVALUE" not in result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_up_says_what_is_wrong_in_one_line(tmp_path, case):
    content, words = CASES[case]
    path = write(tmp_path, case, content)
    result = CliRunner().invoke(main, ["local", "up", "-f", path, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    line = one_line(result.output)
    assert words in line, line
    assert "SECRETVALUE" not in result.output


def test_a_missing_file_and_a_directory_name_the_path(tmp_path):
    for path in (str(tmp_path / "absent.yaml"), str(tmp_path)):
        result = CliRunner().invoke(main, ["render", "-f", path])
        assert path in one_line(result.output)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_names_the_path(tmp_path):
    path = write(tmp_path, "locked", GOOD)
    os.chmod(path, 0)
    result = CliRunner().invoke(main, ["render", "-f", path])
    assert path in one_line(result.output) and "cannot be read" in result.output
