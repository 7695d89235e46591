#!/usr/bin/env bash
# Fetch, on a machine with package-registry access, what the GPU machine lacks (it runs
# Python 3.12 with torch, transformers, peft and Triton, but no deepspeed, nibabel,
# pydicom, decord or liger-kernel, and has no internet) into gpu_wheels/ (ignored by git;
# carried with the tree).
# DeepSpeed comes as its source distribution and as a pure-Python wheel built from it
# here with every op left to JIT, so nothing compiles at install time there.
# The demo data is built here too (it needs nilearn, PyAV and scikit-image, which are
# large), into gpu_wheels/demo_data.
# Usage: bash scripts/fetch_gpu_wheels.sh   (then benchmarks/gpu_suite.sh deps on the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-gpu_wheels}
DEEPSPEED=${DEEPSPEED:-deepspeed==0.19.8}
rm -rf "$DEST"
mkdir -p "$DEST"
export PIP_DISABLE_PIP_VERSION_CHECK=1
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform any)
# The readers and DeepSpeed's pure-Python requirements (what the machine already has is
# left alone by pip at install time).
"$PY" -m pip download --quiet --dest "$DEST" --no-deps "${target[@]}" \
  nibabel pydicom decord==0.6.0 hjson py-cpuinfo msgpack nvidia-ml-py einops psutil ninja tqdm typing-extensions \
  pydantic pydantic-core annotated-types typing-inspection importlib-resources
# The fused linear cross-entropy of the LLM loss (pure Python + Triton; the machine has
# Triton and torch, so its wheel alone).
"$PY" -m pip download --quiet --dest "$DEST" --no-deps "${target[@]}" "${LIGER:-liger-kernel==0.8.5}"
"$PY" -m pip download --quiet --dest "$DEST/src" --no-deps --no-binary :all: "$DEEPSPEED"
sdist=$(ls "$DEST"/src/deepspeed-*.tar.gz)
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
  --wheel-dir "$DEST" "$sdist" >/dev/null
ls "$DEST"/deepspeed-*-py3-none-any.whl >/dev/null \
  || { echo "DeepSpeed did not build as a pure-Python wheel"; exit 1; }
"$PY" -c "from omnivmed.demo import build_demo_dataset; build_demo_dataset('$DEST/demo_data')"
du -sh "$DEST"
total=$(du -sm "$DEST" | cut -f1)
if [ "$total" -gt 40 ]; then echo "gpu_wheels is ${total} MB, over the 40 MB a run can carry"; exit 1; fi
ls "$DEST"
