"""The committed generated files match their generator (scripts/generate.py).

The CRD copies are generated from operator/deepseek_operator/api.py, and manifests/install.yaml from the chart with
helm: edit the sources, then run `python scripts/generate.py`.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _generate_module():
    spec = importlib.util.spec_from_file_location("deepseek_generate", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generate_module()


def assert_current(path: Path, expected: str) -> None:
    rel = path.relative_to(ROOT)
    if not path.is_file():
        pytest.fail(f"{rel} is missing: run `python scripts/generate.py`", pytrace=False)
    actual = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), f"{rel} (committed)",
                                      f"{rel} (generated)"))[:40]
        )
        pytest.fail(f"{rel} is out of date with its generator: run `python scripts/generate.py`\n{diff}", pytrace=False)


@pytest.mark.parametrize("path", generate.CRD_COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_crd_copy_matches_the_api(path):
    assert_current(path, generate.render_crd())


def test_install_yaml_matches_a_fresh_helm_template():
    try:
        helm = generate.find_tool("helm")
    except generate.ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    assert_current(generate.INSTALL, generate.render_install(helm))
