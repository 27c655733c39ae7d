#!/usr/bin/env bash
# The GPU check on a machine that has CUDA, PyTorch, torchvision and transformers but no network
# (the device machines lent to this project): installs the project from the working tree and the
# wheels that scripts/gpu-wheels.sh prepared, runs the GPU-marked tests, then scripts/gpu-check.sh,
# then optionally the select stage at a large index and the restore stage on the machine's cores.
#
#   scripts/gpu-offline.sh [OUT_DIR]     # default: $OUT, else out/gpu-check
#
# Writes into OUT_DIR: log.txt (machine, versions, test output, every step's timing),
# gpu-check.{json,md}, and select / restore / rebuild .{json,md} when asked for.
# Variables: GPU_WHEELS (.whl), GPU_PYTHON (python3), GPU_OFFLINE_SELECT_N (empty: skip),
# GPU_OFFLINE_SELECT_TIMEOUT (150 s), GPU_OFFLINE_RESTORE_SIZES (empty: skip),
# GPU_OFFLINE_RESTORE_TIMEOUT (150 s), GPU_OFFLINE_REBUILD_SIZES (empty: skip; the replay table
# alone, e.g. 1000000 with GPU_OFFLINE_REBUILD_MODES=fast: the fast rebuild at 1M on every core),
# GPU_OFFLINE_REBUILD_MODES (fast), GPU_OFFLINE_REBUILD_TIMEOUT (300 s),
# GPU_OFFLINE_TESTS (1), GPU_OFFLINE_REUSE (0; 1 keeps an
# earlier install on a machine still warm), GPU_COMMIT (logged where .git did not travel), and
# gpu-check.sh's own.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/out/gpu-check}}"
WHL="${GPU_WHEELS:-$ROOT/.whl}"
PY="$(command -v "${GPU_PYTHON:-python3}")"
SITE="${TMPDIR:-/tmp}/infogrowth-site"
BIN="${TMPDIR:-/tmp}/infogrowth-bin"
mkdir -p "$OUT_DIR" "$BIN"
LOG="$OUT_DIR/log.txt"
start=$SECONDS
step() { echo "== $* (at $((SECONDS - start)) s)" | tee -a "$LOG" >&2; }

step machine
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  echo "cores: $(nproc)"; grep -m1 'model name' /proc/cpuinfo || true; free -g | sed -n 2p
  "$PY" -c 'import sys, torch, torchvision, transformers, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "torchvision", torchvision.__version__, "transformers", transformers.__version__,
      "numpy", numpy.__version__)'
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || echo "commit ${GPU_COMMIT:-unknown}"
} >>"$LOG" 2>&1

step install
[[ -d "$WHL/hnswlib" && -d "$WHL/site" ]] || { echo "gpu-offline: run scripts/gpu-wheels.sh first ($WHL)" | tee -a "$LOG" >&2; exit 2; }
if [[ "${GPU_OFFLINE_REUSE:-0}" == 1 && -f "$SITE/.complete" ]]; then
  echo "reusing $SITE" >>"$LOG"
else
rm -rf "$SITE"
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
  --target "$SITE" "$WHL"/*.whl "$WHL/hnswlib" "$ROOT" "$ROOT/devtools" >>"$LOG" 2>&1; then
  echo "gpu-offline: install failed (see $LOG)" >&2; exit 2
fi
touch "$SITE/.complete"
fi
export PYTHONPATH="$SITE:$WHL/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[[ -n "${GPU_COMMIT:-}" ]] && export BENCH_COMMIT="$GPU_COMMIT"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$BIN/python"
printf '#!/bin/sh\nexec "%s" -c "import sys; sys.argv[0] = \\"infogrowth\\"; from infogrowth.cli import main; main()" "$@"\n' "$PY" >"$BIN/infogrowth"
chmod +x "$BIN/python" "$BIN/infogrowth"
"$BIN/infogrowth" --help >>"$LOG" 2>&1 || { echo "gpu-offline: infogrowth does not start (see $LOG)" >&2; exit 2; }

rc=0
if [[ "${GPU_OFFLINE_TESTS:-1}" == 1 ]]; then
  step "pytest -m gpu"
  (cd "$ROOT" && timeout 300 "$PY" -m pytest -p no:cacheprovider -m gpu -q \
    tests/unit/test_encode.py tests/unit/test_device_path.py tests/unit/test_devimage.py) >>"$LOG" 2>&1 || rc=1
  tail -3 "$LOG" >&2
fi

step gpu-check
GPU_CHECK_BIN="$BIN" "$ROOT/scripts/gpu-check.sh" "$OUT_DIR" >>"$LOG" 2>&1 || rc=1
[[ -f "$OUT_DIR/gpu-check.md" ]] && cat "$OUT_DIR/gpu-check.md" >&2

cores="$(nproc)"
if [[ -n "${GPU_OFFLINE_SELECT_N:-}" ]]; then
  step "select at ${GPU_OFFLINE_SELECT_N}"
  timeout --kill-after=10 "${GPU_OFFLINE_SELECT_TIMEOUT:-150}" "$BIN/infogrowth" bench \
    --stage select --n "$GPU_OFFLINE_SELECT_N" --threads "1,$cores" --repeats 2 \
    --workdir "${TMPDIR:-/tmp}/ig-select" \
    --json "$OUT_DIR/select.json" --markdown "$OUT_DIR/select.md" >>"$LOG" 2>&1 || rc=1
  [[ -f "$OUT_DIR/select.md" ]] && cat "$OUT_DIR/select.md" >&2
fi
if [[ -n "${GPU_OFFLINE_RESTORE_SIZES:-}" ]]; then
  step "restore at ${GPU_OFFLINE_RESTORE_SIZES}"
  GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}" \
  timeout --kill-after=10 "${GPU_OFFLINE_RESTORE_TIMEOUT:-150}" "$BIN/infogrowth" bench \
    --stage restore --restore-sizes "$GPU_OFFLINE_RESTORE_SIZES" --repeats 1 \
    --workdir "${TMPDIR:-/tmp}/ig-restore" \
    --json "$OUT_DIR/restore.json" --markdown "$OUT_DIR/restore.md" >>"$LOG" 2>&1 || rc=1
  [[ -f "$OUT_DIR/restore.md" ]] && cat "$OUT_DIR/restore.md" >&2
fi
if [[ -n "${GPU_OFFLINE_REBUILD_SIZES:-}" ]]; then
  step "rebuild at ${GPU_OFFLINE_REBUILD_SIZES} (${GPU_OFFLINE_REBUILD_MODES:-fast})"
  GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}" \
  timeout --kill-after=10 "${GPU_OFFLINE_REBUILD_TIMEOUT:-300}" "$BIN/infogrowth" bench \
    --stage restore --restore-sizes none --rebuild-sizes "$GPU_OFFLINE_REBUILD_SIZES" \
    --rebuild-modes "${GPU_OFFLINE_REBUILD_MODES:-fast}" --repeats 1 \
    --workdir "${TMPDIR:-/tmp}/ig-rebuild" \
    --json "$OUT_DIR/rebuild.json" --markdown "$OUT_DIR/rebuild.md" >>"$LOG" 2>&1 || rc=1
  [[ -f "$OUT_DIR/rebuild.md" ]] && cat "$OUT_DIR/rebuild.md" >&2
fi
step "done (rc $rc)"
exit "$rc"
