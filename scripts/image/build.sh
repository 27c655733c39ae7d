#!/usr/bin/env bash
# `make image`: build $IMAGE from the Dockerfile.
#   docker   when a daemon answers (or IMAGE_BUILDER=docker): a plain `docker build`;
#   buildah  otherwise: buildah bud (chroot isolation, no daemon) on the Debian base of base.sh,
#            with buildah's layer cache and uv's download cache kept in $INFOGROWTH_IMAGE_CACHE.
# Extra arguments go to the builder (e.g. --build-arg TORCH_INDEX_URL=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/image/env.sh

# Drop the cached images this build neither made nor reused (an earlier build's layers), so that
# the cache holds one build's worth: the base, the layers of the last build and tagged images.
prune_unused() {
  local keep id
  keep="$(grep -oE -- '--> (Using cache )?[0-9a-f]{11,64}$' "$1" | awk '{print $NF}' | sort -u)"
  # Newest first, so that children go before their parents.
  buildah images --all --noheading --no-trunc --format '{{.ID}} {{.Name}}' | while read -r id name; do
    id="${id#sha256:}"
    [[ "$name" == "<none>" ]] || continue
    grep -q "^${id:0:11}" <<<"$keep" && continue
    buildah rmi "$id" >/dev/null 2>&1 || true
  done
}

builder="$(image_builder)"
t0=$SECONDS
case "$builder" in
  docker)
    image_log "building $IMAGE with docker"
    DOCKER_BUILDKIT=1 docker build -t "$IMAGE" "$@" .
    ;;
  buildah)
    bash scripts/image/install-tools.sh
    buildah_env
    bash scripts/image/base.sh
    image_log "building $IMAGE with buildah ($(cat "$INFOGROWTH_IMAGE_CACHE/storage-driver") store in $INFOGROWTH_IMAGE_CACHE)"
    # The host's CA bundle (which trusts any TLS-inspecting proxy on the way to PyPI) replaces
    # the base's during RUN steps only: it is never committed into a layer.
    ca=()
    if [[ -f "$IMAGE_CA_BUNDLE" ]]; then
      ca=(--volume "$(readlink -f "$IMAGE_CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro")
    fi
    # --format docker keeps the HEALTHCHECK (OCI image configs have no field for it).
    log="$INFOGROWTH_IMAGE_CACHE/tmp/build.log"
    buildah bud --isolation chroot --layers --force-rm --format docker --pull=false \
      --build-arg PYTHON_IMAGE="$BASE_IMAGE" \
      --build-arg VERSION="$IMAGE_APP_VERSION" "${ca[@]}" \
      -t "$IMAGE" "$@" . 2>&1 | tee "$log" \
      || image_die "buildah bud failed (see above); the layers built so far stay cached"
    prune_unused "$log"
    ;;
  *) image_die "IMAGE_BUILDER must be docker or buildah, not '$builder'" ;;
esac
image_log "$IMAGE built with $builder in $((SECONDS - t0)) s"
