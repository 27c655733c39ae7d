#!/usr/bin/env bash
# The Debian base for a daemonless build: a minbase Debian (bookworm: Python 3.11) root file
# system made by mmdebstrap, imported into the cached buildah store as $BASE_IMAGE. Reused while
# younger than BASE_MAX_AGE_DAYS (then rebuilt, for security updates); `--force` rebuilds now.
set -euo pipefail
source "$(dirname "$0")/env.sh"
buildah_env

stamp="$INFOGROWTH_IMAGE_CACHE/base-$BASE_SUITE.stamp"
if [[ "${1:-}" != "--force" && -f "$stamp" ]] \
  && [[ -z "$(find "$stamp" -mtime +"$BASE_MAX_AGE_DAYS")" ]] \
  && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  exit 0
fi

t0=$SECONDS
work="$(mktemp -d "$INFOGROWTH_IMAGE_CACHE/tmp/base.XXXXXX")"
ctr=""
cleanup() {
  [[ -z "$ctr" ]] || buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

image_log "making the $BASE_SUITE base with mmdebstrap ($BASE_MIRROR)"
# Like the slim Python images: no docs, man pages or locales beyond C.UTF-8.
mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-venv,ca-certificates \
  --aptopt='Acquire::Retries "3"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  "$BASE_SUITE" "$work/rootfs.tar" \
  "deb $BASE_MIRROR $BASE_SUITE main" \
  "deb $BASE_MIRROR $BASE_SUITE-updates main" \
  "deb $BASE_SECURITY_MIRROR $BASE_SUITE-security main" \
  || image_die "mmdebstrap failed to make the $BASE_SUITE root file system"

ctr="$(buildah from scratch)"
buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
buildah config --env LANG=C.UTF-8 \
  --created-by "mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates $BASE_SUITE" \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["python3"]' \
  --label org.opencontainers.image.description="Debian $BASE_SUITE minbase + python3 (mmdebstrap)" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
ctr=""
touch "$stamp"
image_log "base $BASE_IMAGE ready in $((SECONDS - t0)) s"
