#!/usr/bin/env bash
# One short GPU measurement of the embed stage (and the select stage on the machine's cores).
#
#   scripts/gpu-check.sh [OUT_DIR]          # default: $OUT, else out/gpu-check
#
# Installs nothing beyond `make install`, then runs, in one `infogrowth bench` call:
#   * bench --stage embed: a random-weight CLIP ViT-B/16 image tower (built from its config, no
#     download) at 224 px + the packaged MiniLM text tower, fp16 on CUDA, 8,192 samples, batch
#     size from the encoder's warm-up; the bare forward (floor), the stage from encoded bytes
#     with decode on the CPU and on the GPU (nvJPEG), and the stage's share of the floor;
#   * bench --stage select with every core;
# and writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md (the table for docs/benchmarks.md).
# Sized to finish in under 6 minutes on one GPU (the bench is stopped at GPU_CHECK_TIMEOUT).
#
# Without CUDA it refuses to run unless GPU_CHECK_ALLOW_CPU=1 (the test suite runs it that way,
# reduced). Sizes: GPU_CHECK_MODEL (b16 | tiny | path), GPU_CHECK_SAMPLES (8192),
# GPU_CHECK_BATCH (empty: the warm-up picks it), GPU_CHECK_REPEATS (3), GPU_CHECK_SELECT_N
# (100000, prefilled index), GPU_CHECK_SELECT_STREAM (4096), GPU_CHECK_TIMEOUT (330 s),
# GPU_CHECK_CALLS (samples per stage call, e.g. 512,4096; empty: the bench's default),
# GPU_CHECK_DECODE (cpu,device).
# GPU_CHECK_BIN: a bin directory holding `python` and `infogrowth` to use instead of
# `make install` + .venv/bin.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/out/gpu-check}}"
MODEL="${GPU_CHECK_MODEL:-b16}"
SAMPLES="${GPU_CHECK_SAMPLES:-8192}"
BATCH="${GPU_CHECK_BATCH:-}"
REPEATS="${GPU_CHECK_REPEATS:-3}"
SELECT_N="${GPU_CHECK_SELECT_N:-100000}"
SELECT_STREAM="${GPU_CHECK_SELECT_STREAM:-4096}"
LIMIT="${GPU_CHECK_TIMEOUT:-330}"

if [[ -n "${GPU_CHECK_BIN:-}" ]]; then
  BIN="$GPU_CHECK_BIN"
else
  make -C "$ROOT" install >&2
  BIN="$ROOT/.venv/bin"
fi
for tool in python infogrowth; do
  [[ -x "$BIN/$tool" ]] || { echo "gpu-check: $BIN/$tool not found" >&2; exit 2; }
done

if ! "$BIN/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
    echo "gpu-check: no CUDA device; set GPU_CHECK_ALLOW_CPU=1 to run on the CPU anyway" >&2
    exit 3
  fi
  echo "gpu-check: no CUDA device, running on the CPU (GPU_CHECK_ALLOW_CPU=1)" >&2
fi

CORES="$(nproc)"
mkdir -p "$OUT_DIR"
args=(
  bench --stage embed --stage select
  --embed-model "$MODEL" --embed-samples "$SAMPLES" --decode "${GPU_CHECK_DECODE:-cpu,device}"
  --threads "$CORES" --repeats "$REPEATS"
  --n "$SELECT_N" --stream "$SELECT_STREAM"
  --workdir "$OUT_DIR/work"
  --json "$OUT_DIR/gpu-check.json" --markdown "$OUT_DIR/gpu-check.md"
)
[[ -n "$BATCH" ]] && args+=(--embed-batch "$BATCH")
[[ -n "${GPU_CHECK_CALLS:-}" ]] && args+=(--embed-calls "$GPU_CHECK_CALLS")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export INFOGROWTH_CACHE_DIR="${INFOGROWTH_CACHE_DIR:-${TMPDIR:-/tmp}/infogrowth-gpu-check-cache}"
start=$SECONDS
timeout --signal=TERM --kill-after=20 "$LIMIT" "$BIN/infogrowth" "${args[@]}"
rm -rf "$OUT_DIR/work"
echo "gpu-check: done in $((SECONDS - start)) s; $OUT_DIR/gpu-check.md" >&2
