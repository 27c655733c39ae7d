#!/usr/bin/env bash
# Installs the deployment test tools, idempotently, and prints nothing when they are present.
#
#   helm      built from its Go module (no Helm package in Debian) into
#             $INFOGROWTH_TOOLS_DIR/helm-<version>/helm (default ~/.cache/infogrowth/tools)
#   promtool  and the prometheus server, from Debian's `prometheus` package when missing
#
# hadolint and kubernetes-validate come from the project's `dev` extras (.venv), not from here.
# Usage: scripts/install-tools.sh [helm|prometheus]...   (no argument: all of them)
# `scripts/install-tools.sh --print-helm` prints the helm binary path and installs nothing.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_KUBE_VERSION="${HELM_KUBE_VERSION:-1.37}"   # Kubernetes minor of that Helm release
CACHE_DIR="${INFOGROWTH_CACHE_DIR:-$HOME/.cache/infogrowth}"
TOOLS_DIR="${INFOGROWTH_TOOLS_DIR:-$CACHE_DIR/tools}"
HELM_BIN="$TOOLS_DIR/helm-$HELM_VERSION/helm"

log() { echo "install-tools: $*" >&2; }

install_helm() {
  # The ldflags of Helm's own release build: its version, and the Kubernetes version that
  # `helm template` / `helm lint` assume without a cluster (client-go v0.37 -> 1.37).
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  local p
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $p.k8sVersionMajor=${HELM_KUBE_VERSION%%.*} -X $p.k8sVersionMinor=${HELM_KUBE_VERSION#*.}"
  done
  local dest stamp
  dest="$(dirname "$HELM_BIN")"
  stamp="$dest/.ldflags"
  if [[ -x "$HELM_BIN" && -f "$stamp" && "$(cat "$stamp")" == "$ldflags" ]] \
    && "$HELM_BIN" version --short >/dev/null 2>&1; then
    return 0
  fi
  command -v go >/dev/null || { log "go is required to build helm $HELM_VERSION"; exit 1; }
  log "building helm $HELM_VERSION from helm.sh/helm/v3 (once; cached in $dest)"
  mkdir -p "$dest"
  local tmp
  tmp="$(mktemp -d "$dest/.build.XXXXXX")"
  if ! CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"; then
    rm -rf "$tmp"
    exit 1
  fi
  mv -f "$tmp/helm" "$HELM_BIN"   # same file system: atomic, a concurrent reader sees old or new
  rm -rf "$tmp"
  printf '%s' "$ldflags" >"$stamp"
  "$HELM_BIN" version --short >&2
}

install_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    return 0
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { log "promtool is missing; run: apt-get install -y prometheus"; exit 1; }
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null || { log "promtool is missing and apt-get is unavailable"; exit 1; }
  log "installing Debian's prometheus package (promtool + server)"
  # No service is started: the tests run their own server on a loopback port.
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends prometheus >/dev/null \
    || { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
  promtool --version 2>&1 | head -1 >&2
}

if [[ "${1:-}" == "--print-helm" ]]; then
  echo "$HELM_BIN"
  exit 0
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(helm prometheus)
for t in "${targets[@]}"; do
  case "$t" in
    helm) install_helm ;;
    prometheus) install_prometheus ;;
    *) log "unknown tool: $t"; exit 2 ;;
  esac
done
