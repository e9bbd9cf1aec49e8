"""The packages' layout: folders named as they import, and imports that form a tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Import name -> the folder that holds it.
PACKAGES = {
    "deepseek_contract": ROOT / "contract" / "deepseek_contract",
    "deepseek_operator": ROOT / "operator" / "deepseek_operator",
    "deepseek_builder": ROOT / "build" / "deepseek_builder",
    "deepseek_model_repository": ROOT / "model_repository" / "deepseek_model_repository",
    "deepseek_local": ROOT / "local" / "deepseek_local",
    "deepseek_cli": ROOT / "cli" / "deepseek_cli",
}


def imported_packages(package: str) -> dict[str, list[str]]:
    """The project packages that ``package`` imports, each with the files that import it."""
    found: dict[str, list[str]] = {}
    for path in PACKAGES[package].rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


GRAPH = {package: imported_packages(package) for package in PACKAGES}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_lives_in_a_folder_of_its_import_name(package):
    folder = PACKAGES[package]
    assert (folder / "__init__.py").is_file(), f"{folder} must be the package {package}"
    assert not (folder.parent / "__init__.py").exists(), f"{folder.parent} must not be a package of its own"


def test_the_contract_is_a_leaf():
    assert GRAPH["deepseek_contract"] == {}, f"the contract imports {GRAPH['deepseek_contract']}"


def test_the_operator_and_the_builder_do_not_import_each_other():
    assert "deepseek_builder" not in GRAPH["deepseek_operator"], GRAPH["deepseek_operator"]["deepseek_builder"]
    assert "deepseek_operator" not in GRAPH["deepseek_builder"], GRAPH["deepseek_builder"]["deepseek_operator"]


def test_the_package_imports_have_no_cycle():
    state: dict[str, str] = {}

    def visit(package: str, path: list[str]) -> None:
        state[package] = "open"
        for dep in GRAPH[package]:
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle) + f" (via {GRAPH[package][dep][0]})")
            if dep not in state:
                visit(dep, path + [dep])
        state[package] = "done"

    for package in PACKAGES:
        if package not in state:
            visit(package, [package])


def test_the_vocabulary_is_defined_once():
    """No package but the contract spells out the list of tasks, backends or precisions."""
    spelled = ('"text-generation", "text-classification", "feature-extraction"', '"fp32", "fp16", "bf16", "int8"',
               '"deepseek_v3", "deepseek_v2", "qwen2", "llama"')
    for package, folder in PACKAGES.items():
        if package == "deepseek_contract":
            continue
        for path in folder.rglob("*.py"):
            text = path.read_text()
            for literal in spelled:
                assert literal not in text, f"{path.relative_to(ROOT)} repeats the vocabulary {literal}"
