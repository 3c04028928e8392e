#!/usr/bin/env bash
# Build the wheelhouse the GPU benchmarks need on a bare, offline GPU image that already has
# torch, triton and numpy (see bench/gpu/README.md). Run on a machine with access to PyPI:
#     bash bench/gpu/wheels.sh [--python-version 3.12] [--out .gpu-wheels]
# The result (~10 MB) travels to the GPU box with the working tree; bench/gpu/run.sh installs it.
set -euo pipefail
PYVER=3.12
OUT=.gpu-wheels
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument: $1 (expected --python-version X.Y or --out DIR)" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || { echo "no python with torch at $PY: run 'make install' first or set PYTHON" >&2; exit 2; }
DS_VERSION="$("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)" || {
  echo "$PY cannot import deepspeed: run 'make install' first or set PYTHON to one that can" >&2; exit 2; }
TORCHAO_VERSION="${TORCHAO_VERSION:-0.17.0}"   # abi3 wheel that works with torch 2.11
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Binary wheels for the GPU image's Python. --no-deps keeps torch and numpy out; pydantic comes
# with its dependencies because it pins pydantic-core exactly.
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
"$PY" -m pip download --quiet --dest "$OUT" --no-deps "${TARGET[@]}" \
  pyyaml webdataset braceexpand hjson py-cpuinfo msgpack psutil tqdm packaging einops ninja \
  "torchao==$TORCHAO_VERSION"
"$PY" -m pip download --quiet --dest "$OUT" "${TARGET[@]}" "pydantic>=2"

# DeepSpeed publishes only an sdist: build a pure-Python wheel of the version used here, ops
# JIT-compiled on the GPU box when needed.
if ! ls "$OUT"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --quiet --dest "$WORK" --no-deps --no-binary=:all: "deepspeed==$DS_VERSION"
  tar -xzf "$WORK"/deepspeed-*.tar.gz -C "$WORK"
  (cd "$WORK"/deepspeed-"$DS_VERSION" && DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps \
     --no-build-isolation --wheel-dir "$OUT" .)
fi
echo "$PYVER" > "$OUT/PYTHON_VERSION"  # run.sh checks the GPU image's Python against it
ls -1 "$OUT"
du -sh "$OUT"
