#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv with the project and its test tools,
# plus the helm, kubectl and prometheus binaries the tests use. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.bootstrap-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing Python packages (first run: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  # The CPU build of torch first, pinned exactly: a looser requirement would pull several GB of CUDA wheels.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[builder,local,dev]"
  touch "$stamp"
fi

if [ -x scripts/install-tools.sh ]; then
  scripts/install-tools.sh
fi
