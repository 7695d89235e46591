#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a CUDA machine, in one go. Logs and benchmark
# JSON go to $OUT (default ./gpu_out).
# Usage: bash benchmarks/gpu_suite.sh [env|deps|build|test|sanitize|bench|memory|e2e]...
# `deps` installs, offline, what the machine lacks from gpu_wheels/ (made beforehand by
# scripts/fetch_gpu_wheels.sh on a machine with registry access; carry it with the tree).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
for step in "${steps[@]}"; do
  echo "=== $step ==="
  case $step in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/env.txt"
      $PY -c "import torch,sys;print(sys.version);print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.txt"
      ;;
    deps)
      [ -d gpu_wheels ] || { echo "gpu_wheels/ is missing: run scripts/fetch_gpu_wheels.sh where PyPI is reachable and carry gpu_wheels/"; exit 1; }
      # DeepSpeed as a pure-Python wheel: its ops JIT-compile when first used, if ever.
      DS_BUILD_OPS=0 $PY -m pip install --no-index --find-links gpu_wheels nibabel pydicom decord \
        gpu_wheels/deepspeed-*-py3-none-any.whl >"$OUT/deps.log" 2>&1 \
        || { echo "offline install failed"; tail -20 "$OUT/deps.log"; exit 1; }
      $PY -c "import deepspeed, nibabel, pydicom, decord; print('deps:', deepspeed.__version__, nibabel.__version__, pydicom.__version__, decord.__version__)" 2>&1 \
        | tee -a "$OUT/deps.log" | tail -1
      [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
      ;;
    build)
      # Use the system compiler: a wrapper compiler that links its own copy of libstdc++
      # into the extension gives the process two C++ runtimes, and the first C++
      # exception's message then crashes. OMNIVMED_KEEP_CXX=1 keeps $CXX.
      if [ -x /usr/bin/g++ ] && [ -z "${OMNIVMED_KEEP_CXX:-}" ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
      rm -rf build
      # Only the machine's own architecture, to save build time on a lent device.
      cap=$($PY -c "import torch;m,n=torch.cuda.get_device_capability();print(f'{m}.{n}')")
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} MAX_JOBS=${MAX_JOBS:-16} OMNIVMED_FORCE_CUDA=1 \
        OMNIVMED_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1 \
        || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
      $PY scripts/check_ptxas_report.py "$OUT/build.log" --json "$OUT/ptxas_report.json" || status=1
      ;;
    test)
      (cd tests && $PY -m pytest -q -p no:cacheprovider --rootdir=.. . 2>&1 | tee "$OUT/pytest.log" | tail -25) || status=1
      ;;
    sanitize)
      for tool in memcheck racecheck initcheck synccheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 $PY tests/sanitize_cuda_ops.py >"$OUT/sanitize_$tool.log" 2>&1
        rc=$?
        echo "compute-sanitizer $tool: exit $rc; $(grep -E 'ERROR SUMMARY|mismatches' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
        [ $rc -ne 0 ] && status=1
      done
      ;;
    bench)
      for b in ${BENCHES:-bench_rope bench_rope_attention bench_l1_prune}; do
        $PY benchmarks/$b.py --device cuda 2>&1 | tee "$OUT/$b.log" | tail -20
      done
      cp benchmarks/results/*.json "$OUT/" 2>/dev/null
      ;;
    memory)
      # Peak memory per GPU of the 1.5B architecture (random weights), stage 3, ZeRO-2.
      $PY benchmarks/bench_train.py --memory omnivmed-1.5b-shape 2>&1 | tee "$OUT/train_memory.log" | tail -8
      cp benchmarks/results/train_memory_*.json "$OUT/" 2>/dev/null
      ;;
    e2e)
      # The whole stack at the 1.5B shape in bf16: tower, training with and without
      # pruning, memory, l1_prune, inference latency; summary table last (about 8 min).
      $PY benchmarks/bench_e2e.py --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e.log" | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
