#!/usr/bin/env bash
# `make test-image`: the smoke test of scripts/image/smoke.py on $IMAGE, in buildah's store.
# An image built by docker is copied from the daemon into that store first. PYTHON: an
# interpreter with the project installed (the Makefile passes the virtualenv's).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/image/env.sh
PYTHON="${PYTHON:-.venv/bin/python}"

bash scripts/image/install-tools.sh
buildah_env
if [[ "$(image_builder)" == docker ]]; then
  image_log "copying $IMAGE from the docker daemon into buildah's store"
  buildah pull --quiet "docker-daemon:$IMAGE" >/dev/null \
    || image_die "docker has no image $IMAGE: run \`make image\` first"
fi
exec "$PYTHON" scripts/image/smoke.py --image "$IMAGE" "$@"
