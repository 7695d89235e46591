#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv inside the checkout and install omnivmed
# into it, compiling the fused ops (CUDA kernels too when torch is a CUDA build and nvcc
# is present). Usage: bash scripts/setup.sh [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Every cache lives inside the workspace.
export PIP_CACHE_DIR="$ROOT/.cache/pip" XDG_CACHE_HOME="$ROOT/.cache" \
  TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions" HF_HOME="$ROOT/.cache/huggingface" \
  MPLCONFIGDIR="$ROOT/.cache/matplotlib" PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${OMNIVMED_TORCH:-torch==2.14.1}

if [ "${1:-}" = "--fresh" ]; then rm -rf .venv build; fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --progress-bar off)
"${PIP[@]}" --upgrade pip setuptools wheel ninja numpy
echo "== installing $TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC"
echo "== building and installing omnivmed (MAX_JOBS=${MAX_JOBS:=2})"
export MAX_JOBS
start=$(date +%s)
"${PIP[@]}" --no-build-isolation ".[dev]"
echo "== built in $(( $(date +%s) - start )) s"
.venv/bin/omnivmed-info
