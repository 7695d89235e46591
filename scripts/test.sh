#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, the CMake build with its C++ unit
# tests (ctest) and the CUDA kernels' register report (fails on spills), and pytest. CUDA
# tests skip without a GPU; the CUDA sources are still compiled (sm_80 and sm_90) whenever
# torch is a CUDA build and nvcc is present.
# Usage: bash scripts/test.sh [--fresh] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
fresh=()
if [ "${1:-}" = "--fresh" ]; then fresh=(--fresh); shift; fi
bash scripts/setup.sh "${fresh[@]}"
export PIP_CACHE_DIR="$ROOT/.cache/pip" XDG_CACHE_HOME="$ROOT/.cache" \
  TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions" HF_HOME="$ROOT/.cache/huggingface" \
  MPLCONFIGDIR="$ROOT/.cache/matplotlib" TORCHINDUCTOR_CACHE_DIR="$ROOT/.cache/inductor"
PY=$ROOT/.venv/bin/python

echo "== ruff"
"$PY" -m ruff check .
"$PY" -m ruff format --check . || { echo "ruff format would change files: run 'ruff format .'"; exit 1; }

echo "== CMake build and ctest"
start=$(date +%s)
PATH="$ROOT/.venv/bin:$PATH" cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$PY" \
  -DOMNIVMED_PTXAS_VERBOSE=ON >build/cmake.log 2>&1 \
  || { tail -40 build/cmake.log; exit 1; }
PATH="$ROOT/.venv/bin:$PATH" cmake --build build/cmake -j "${MAX_JOBS:-2}" >>build/cmake.log 2>&1 \
  || { tail -40 build/cmake.log; exit 1; }
# Registers and spills of every CUDA kernel (fails on any spill).
"$PY" scripts/check_ptxas_report.py build/cmake.log
ctest --test-dir build/cmake --output-on-failure
echo "== CMake build and ctest took $(( $(date +%s) - start )) s"

echo "== WordNet for METEOR (omnivmed-eval)"
if wordnet=$(bash scripts/fetch_wordnet.sh); then export OMNIVMED_WORDNET=$wordnet; fi
echo "== headless Chromium for the viewer's browser test"
if chromium=$(bash scripts/fetch_chromium.sh); then export OMNIVMED_CHROMIUM=$chromium; fi

echo "== pytest"
# From tests/, so the installed package (not the source folder) is what gets imported.
cd tests
"$PY" -m pytest -p no:cacheprovider --rootdir="$ROOT" "$@" .
