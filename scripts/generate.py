#!/usr/bin/env python3
"""Regenerate the committed copies of generated manifests.

    python scripts/generate.py           # rewrite them
    python scripts/generate.py --check   # exit 1, naming the stale files, if any differ

* manifests/crd.yaml and charts/deepseek-operator/crds/deepseekmodels.yaml: the DeepSeekModel CRD,
  from the pydantic API (``deepseek_operator.crd.render_crd_yaml``);
* manifests/install.yaml: a plain ``kubectl apply`` install, rendered from the chart with ``helm template``
  (release deepseek-operator, namespace deepseek-system, default values, CRDs included).

helm is looked up in .tools/bin/ (see scripts/install-tools.sh), then on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "deepseek-operator"
CRD_COPIES = (ROOT / "manifests" / "crd.yaml", CHART / "crds" / "deepseekmodels.yaml")
INSTALL = ROOT / "manifests" / "install.yaml"
RELEASE = "deepseek-operator"
NAMESPACE = "deepseek-system"


class ToolMissing(RuntimeError):
    """A command-line tool the generator or the tests need is not installed."""


def find_tool(name: str) -> str:
    """The path of ``name`` in .tools/bin/ or on PATH; ToolMissing says how to install it."""
    local = ROOT / ".tools" / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissing(f"{name} not found in {local.parent} or on PATH: run scripts/install-tools.sh")


def render_crd() -> str:
    from deepseek_operator.crd import render_crd_yaml

    return render_crd_yaml()


def render_install(helm: str | None = None) -> str:
    """The chart rendered with default values, preceded by its Namespace, as one YAML stream."""
    helm = helm or find_tool("helm")
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{proc.stderr}")
    header = (
        "# Generated from charts/deepseek-operator by `python scripts/generate.py` (helm template, default values).\n"
        "# Do not edit by hand. Install with: kubectl apply --server-side -f manifests/install.yaml\n"
        "---\n"
        "apiVersion: v1\n"
        "kind: Namespace\n"
        "metadata:\n"
        f"  name: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: deepseek-operator\n"
        "    pod-security.kubernetes.io/enforce: restricted\n"
    )
    return header + proc.stdout


def outputs(helm: str | None = None) -> dict[Path, str]:
    """Every generated file and the content it should have (install.yaml from the chart as it is on disk)."""
    crd = render_crd()
    files = {path: crd for path in CRD_COPIES}
    files[INSTALL] = render_install(helm)
    return files


def write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"generate: wrote {path.relative_to(ROOT)}")


def stale(files: dict[Path, str]) -> list[Path]:
    """The files whose committed content differs from what the generator writes."""
    return [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    try:
        files = outputs()
    except (ToolMissing, RuntimeError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    if args.check:
        bad = stale(files)
        for path in bad:
            print(f"generate: {path.relative_to(ROOT)} is stale: run python scripts/generate.py", file=sys.stderr)
        return 1 if bad else 0
    # The chart's CRD copy goes in before helm renders install.yaml, which includes it.
    for path in CRD_COPIES:
        write(path, files[path])
    try:
        write(INSTALL, render_install())
    except (ToolMissing, RuntimeError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
