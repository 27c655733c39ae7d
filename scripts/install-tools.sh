#!/usr/bin/env bash
# Installs the deployment test tools, idempotently, and prints nothing when they are present.
#
#   helm      built from its Go module (no Helm package in Debian) into
#             $INFOGROWTH_TOOLS_DIR/helm-<version>/helm (default ~/.cache/infogrowth/tools)
#   promtool  and the prometheus server, from Debian's `prometheus` package when missing
#   strimzi-crds  Strimzi's KafkaTopic and KafkaUser CustomResourceDefinitions, as Strimzi ships
#             them in the test jar of io.strimzi:api (Maven Central, fetched with `mvn`), into
#             $INFOGROWTH_TOOLS_DIR/strimzi-crds-<version>/
#
# hadolint and kubernetes-validate come from the project's `dev` extras (.venv), not from here.
# Usage: scripts/install-tools.sh [helm|prometheus|strimzi-crds]...   (no argument: all of them)
# `scripts/install-tools.sh --print-helm` prints the helm binary path and installs nothing;
# `--print-strimzi-crds` the folder of the Strimzi CRDs.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_KUBE_VERSION="${HELM_KUBE_VERSION:-1.37}"   # Kubernetes minor of that Helm release
CACHE_DIR="${INFOGROWTH_CACHE_DIR:-$HOME/.cache/infogrowth}"
TOOLS_DIR="${INFOGROWTH_TOOLS_DIR:-$CACHE_DIR/tools}"
HELM_BIN="$TOOLS_DIR/helm-$HELM_VERSION/helm"
STRIMZI_VERSION="${STRIMZI_VERSION:-0.51.0}"   # its CRDs serve kafka.strimzi.io v1 and v1beta2
STRIMZI_CRDS="$TOOLS_DIR/strimzi-crds-$STRIMZI_VERSION"
STRIMZI_FILES=(043-Crd-kafkatopic.yaml 044-Crd-kafkauser.yaml)

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

install_strimzi_crds() {
  local f missing=0
  for f in "${STRIMZI_FILES[@]}"; do [[ -s "$STRIMZI_CRDS/$f" ]] || missing=1; done
  [[ $missing == 0 ]] && return 0
  command -v mvn >/dev/null || { log "mvn is required to fetch io.strimzi:api:$STRIMZI_VERSION"; exit 1; }
  log "fetching Strimzi $STRIMZI_VERSION CRDs (io.strimzi:api:$STRIMZI_VERSION:jar:tests)"
  mkdir -p "$TOOLS_DIR"
  local tmp
  tmp="$(mktemp -d "$TOOLS_DIR/.strimzi.XXXXXX")"
  if ! mvn -q -B -Dstyle.color=never dependency:copy \
    -Dartifact="io.strimzi:api:$STRIMZI_VERSION:jar:tests" -DoutputDirectory="$tmp" -Dmdep.useBaseVersion=true; then
    rm -rf "$tmp"
    exit 1
  fi
  # crds/v1beta2/ holds every served version of each CRD (v1, v1beta2, ...).
  python3 - "$tmp/api-$STRIMZI_VERSION-tests.jar" "$tmp/crds" "${STRIMZI_FILES[@]}" <<'PY'
import sys, zipfile, pathlib
jar, out, names = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
out.mkdir()
with zipfile.ZipFile(jar) as z:
    for name in names:
        (out / name).write_bytes(z.read(f"crds/v1beta2/{name}"))
PY
  rm -rf "$STRIMZI_CRDS"
  mv "$tmp/crds" "$STRIMZI_CRDS"
  rm -rf "$tmp"
}

if [[ "${1:-}" == "--print-strimzi-crds" ]]; then
  echo "$STRIMZI_CRDS"
  exit 0
fi
if [[ "${1:-}" == "--print-helm" ]]; then
  echo "$HELM_BIN"
  exit 0
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(helm prometheus strimzi-crds)
for t in "${targets[@]}"; do
  case "$t" in
    helm) install_helm ;;
    prometheus) install_prometheus ;;
    strimzi-crds) install_strimzi_crds ;;
    *) log "unknown tool: $t"; exit 2 ;;
  esac
done
