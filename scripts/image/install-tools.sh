#!/usr/bin/env bash
# Installs Debian's buildah and mmdebstrap when missing (the daemonless image build and run);
# prints nothing when they are present. Needs root or sudo, and apt-get.
set -euo pipefail

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
[[ ${#missing[@]} -eq 0 ]] && exit 0

log() { echo "install-image-tools: $*" >&2; }
command -v apt-get >/dev/null || { log "missing ${missing[*]} and apt-get is unavailable: install them"; exit 1; }
sudo=()
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null || { log "missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}"; exit 1; }
  sudo=(sudo)
fi
log "installing Debian packages: ${missing[*]}"
apt_install() {
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
apt_install "${missing[@]}" || { "${sudo[@]}" apt-get update -q >/dev/null && apt_install "${missing[@]}"; }
for tool in "${missing[@]}"; do
  command -v "$tool" >/dev/null || { log "$tool is still missing after apt-get install"; exit 1; }
done
buildah --version >&2
