# Shared settings of the image scripts (sourced, not run). Override any of them in the environment.
#
#   IMAGE                   name:tag to build and test (default: the chart's default image,
#                           infogrowth:<appVersion>)
#   INFOGROWTH_IMAGE_CACHE  everything cached between builds on this machine: the Debian base
#                           rootfs, buildah's image store (its layer cache) and the uv download
#                           cache of RUN --mount=type=cache (default ~/.cache/infogrowth/image)
#   IMAGE_STORAGE_DRIVER    overlay when the kernel lets us mount one, else vfs (slow: every
#                           layer is a full copy)
#   IMAGE_CA_BUNDLE         the CA bundle RUN steps trust (buildah builds; default: the host's)
#   IMAGE_BUILDER           docker | buildah (default: docker when a daemon answers, else buildah)

_image_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE_APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$_image_root/helm/infogrowth/Chart.yaml")"
IMAGE="${IMAGE:-infogrowth:${IMAGE_APP_VERSION}}"
INFOGROWTH_IMAGE_CACHE="${INFOGROWTH_IMAGE_CACHE:-${INFOGROWTH_CACHE_DIR:-$HOME/.cache/infogrowth}/image}"
BASE_SUITE="${BASE_SUITE:-bookworm}"
BASE_MIRROR="${BASE_MIRROR:-http://deb.debian.org/debian}"
BASE_SECURITY_MIRROR="${BASE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
BASE_IMAGE="${BASE_IMAGE:-localhost/infogrowth-base:$BASE_SUITE}"
IMAGE_CA_BUNDLE="${IMAGE_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
# Rebuild the base (security updates) when it is older than this many days.
BASE_MAX_AGE_DAYS="${BASE_MAX_AGE_DAYS:-7}"

image_log() { echo "image: $*" >&2; }
image_die() { echo "image: ERROR: $*" >&2; exit 1; }

docker_answers() {
  command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

image_builder() {
  if [[ -n "${IMAGE_BUILDER:-}" ]]; then
    echo "$IMAGE_BUILDER"
  elif docker_answers; then
    echo docker
  else
    echo buildah
  fi
}

# Kernel overlayfs needs root and a kernel/sandbox that allows the mount; probe it once.
_overlay_mounts() {
  [[ "$(id -u)" == 0 ]] || return 1
  local d rc
  d="$(mktemp -d)"
  mkdir -p "$d"/{l,u,w,m}
  rc=1
  if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
    umount "$d/m" && rc=0
  fi
  rm -rf "$d"
  return $rc
}

# Point every buildah call at the cached store: writes $INFOGROWTH_IMAGE_CACHE/storage.conf and
# exports CONTAINERS_STORAGE_CONF. The driver is remembered: a store never changes driver.
buildah_env() {
  mkdir -p "$INFOGROWTH_IMAGE_CACHE/tmp"
  local conf="$INFOGROWTH_IMAGE_CACHE/storage.conf" driver="${IMAGE_STORAGE_DRIVER:-}"
  if [[ -z "$driver" && -f "$INFOGROWTH_IMAGE_CACHE/storage-driver" ]]; then
    driver="$(cat "$INFOGROWTH_IMAGE_CACHE/storage-driver")"
  fi
  if [[ -z "$driver" ]]; then
    if _overlay_mounts; then driver=overlay; else driver=vfs; fi
  fi
  printf '%s\n' "$driver" >"$INFOGROWTH_IMAGE_CACHE/storage-driver"
  cat >"$conf" <<CONF
[storage]
driver = "$driver"
graphroot = "$INFOGROWTH_IMAGE_CACHE/storage"
runroot = "$INFOGROWTH_IMAGE_CACHE/runroot"
CONF
  export CONTAINERS_STORAGE_CONF="$conf"
  # RUN --mount=type=cache lives under \$TMPDIR/buildah-cache: keep it with the cache.
  export TMPDIR="$INFOGROWTH_IMAGE_CACHE/tmp"
  export BUILDAH_ISOLATION=chroot
}
