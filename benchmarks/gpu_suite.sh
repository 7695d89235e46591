#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a CUDA machine, in one go. Logs and benchmark
# JSON go to $OUT (default ./gpu_out); a short summary table is printed last.
# Usage: bash benchmarks/gpu_suite.sh [env|deps|build|test|sanitize|bench|memory|e2e|train_e2e|summary]...
#   (no steps: env build test bench sanitize summary)
#   `tower` runs bench_e2e.py's tower part alone (attention backends, compiled layers, MFU,
#   SiglipVisionModel beside it); `--smoke` (first argument) runs the kernel benchmark and
#   the tower part on the CPU with tiny sizes, no build: bash benchmarks/gpu_suite.sh --smoke
# `deps` installs, offline, what the machine lacks from gpu_wheels/ (made beforehand by
# scripts/fetch_gpu_wheels.sh on a machine with registry access; carry it with the tree).
# A build or test failure stops the run at once (a broken kernel must cost one short run).
# SUITE_SECONDS (default 560) bounds the whole run: every step gets at most what is left,
# less a reserve for the summary, so a hang in one step cannot eat the rest.
# E2E_PARTS picks bench_e2e.py's parts (default all), TRAIN_E2E_PARTS train_e2e's (default
# train,memory,infer); BENCHES the kernel benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SMOKE=
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; BENCHES=${BENCHES:-bench_rope_attention}; shift; [ $# -eq 0 ] && set -- bench tower summary; fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env build test bench sanitize summary)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${SUITE_SECONDS:-560} ))
status=0
# PACK=1: everything under $OUT ends up in one archive (for transports that bring back
# only a few files), also when a step stops the run.
if [ -n "${PACK:-}" ]; then
  trap 'tar czf /tmp/gpu_suite_out.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_suite_out.tgz "$OUT"/' EXIT
fi

# Seconds a step may run: its own cap, or what is left before the deadline (less 15 s for
# the summary), whichever is smaller.
budget() {
  local left=$(( deadline - $(date +%s) - 15 ))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
# run_bounded CAP LOG CMD...: runs CMD with a time bound, output to LOG; returns its code
# (124 when the bound cut it short).
run_bounded() {
  local cap; cap=$(budget "$1"); local log=$2; shift 2
  if [ "$cap" -le 5 ]; then echo "skipped: no time left" | tee -a "$log"; return 124; fi
  timeout --kill-after=5 "$cap" "$@" >>"$log" 2>&1
}

for step in "${steps[@]}"; do
  echo "=== $step ($(( deadline - $(date +%s) )) s left) ==="
  step_start=$(date +%s)
  case $step in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/env.txt"
      $PY -c "import torch,sys;print(sys.version);print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.txt"
      ;;
    deps)
      [ -d gpu_wheels ] || { echo "gpu_wheels/ is missing: run scripts/fetch_gpu_wheels.sh where PyPI is reachable and carry gpu_wheels/"; exit 1; }
      # DeepSpeed as a pure-Python wheel: its ops JIT-compile when first used, if ever.
      DS_BUILD_OPS=0 run_bounded 120 "$OUT/deps.log" $PY -m pip install --no-index --find-links gpu_wheels \
        nibabel pydicom decord liger-kernel gpu_wheels/deepspeed-*-py3-none-any.whl \
        || { echo "offline install failed"; tail -20 "$OUT/deps.log"; status=1; continue; }
      $PY -c "import deepspeed, nibabel, pydicom, decord, liger_kernel; print('deps:', deepspeed.__version__, nibabel.__version__, pydicom.__version__, decord.__version__, 'liger-kernel')" 2>&1 \
        | tee -a "$OUT/deps.log" | tail -1
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
        OMNIVMED_PTXAS_VERBOSE=1 run_bounded 300 "$OUT/build.log" \
        $PY -m pip install --no-build-isolation --no-deps -v . \
        || { echo "BUILD FAILED: stopping"; tail -40 "$OUT/build.log"; exit 1; }
      $PY scripts/check_ptxas_report.py "$OUT/build.log" --json "$OUT/ptxas_report.json" | tail -5 || status=1
      $PY -c "import omnivmed_ext as e; print('extension:', e.__file__, 'cuda ops loaded:', e._library.library_loaded())" 2>&1 | tee -a "$OUT/build.log"
      ;;
    test)
      # The CUDA tests of the three ops (TESTS overrides: e.g. TESTS=. for everything).
      # A per-test time bound turns a hung kernel into a failure instead of a lost run.
      (cd tests && run_bounded 200 "$OUT/pytest.log" $PY -m pytest -q -p no:cacheprovider \
        --rootdir=.. -m cuda --timeout 120 --maxfail 20 -rf \
        ${TESTS:-test_rope_attention.py test_rope_nd.py test_l1_prune.py})
      rc=$?
      tail -25 "$OUT/pytest.log"
      [ $rc -ne 0 ] && { echo "TESTS FAILED (exit $rc): stopping"; exit 1; }
      ;;
    sanitize)
      for tool in memcheck racecheck initcheck synccheck; do
        run_bounded 60 "$OUT/sanitize_$tool.log" compute-sanitizer --tool $tool --error-exitcode 9 \
          $PY tests/sanitize_cuda_ops.py
        rc=$?
        echo "compute-sanitizer $tool: exit $rc; $(grep -E 'ERROR SUMMARY|mismatches' "$OUT/sanitize_$tool.log" | tr '\n' ' ')" \
          | tee -a "$OUT/sanitize_summary.txt"
        [ $rc -ne 0 ] && status=1
      done
      ;;
    bench)
      for b in ${BENCHES:-bench_rope_attention bench_l1_prune}; do
        if [ -n "$SMOKE" ]; then bench_args=(--device cpu --iters 2 --warmup 1 --no-save); else bench_args=(--device cuda); fi
        run_bounded 180 "$OUT/$b.log" $PY benchmarks/$b.py "${bench_args[@]}" || status=1
        tail -22 "$OUT/$b.log"
      done
      cp benchmarks/results/*.json "$OUT/" 2>/dev/null
      ;;
    tower)
      # The vision tower at the so400m shape, bf16, forward+backward: unpruned and pruned at
      # 0.1, composite (the old default) vs flash, compiled layers or not, MFU; and
      # transformers' SiglipVisionModel at 384 beside it.
      run_bounded 300 "$OUT/tower.log" $PY benchmarks/bench_e2e.py ${SMOKE:+--smoke} \
        --out "$OUT/tower" --parts tower || status=1
      tail -14 "$OUT/tower.log"
      ;;
    memory)
      # Peak memory per GPU of the 1.5B architecture (random weights), stage 3, ZeRO-2.
      run_bounded 300 "$OUT/train_memory.log" $PY benchmarks/bench_train.py --memory omnivmed-1.5b-shape
      tail -8 "$OUT/train_memory.log"
      cp benchmarks/results/train_memory_*.json "$OUT/" 2>/dev/null
      ;;
    e2e)
      # The whole stack at the 1.5B shape in bf16: tower (fused vs composite), training
      # with and without pruning, memory, inference latency; summary table last.
      run_bounded 480 "$OUT/e2e.log" $PY benchmarks/bench_e2e.py --out "$OUT/e2e" \
        --parts "${E2E_PARTS:-tower,train,memory,l1_prune,infer}" || status=1
      tail -30 "$OUT/e2e.log"
      ;;
    train_e2e)
      # The training step at the 1.5B shape: training (pruning on, off, and the step as it
      # was before the DataLoader, packing, varlen LLM attention and fused loss), memory,
      # inference, in that order, so a cut run keeps the most important numbers (the JSON
      # is rewritten after each part, train_partial.json after each training run).
      df -h /dev/shm >>"$OUT/train_e2e.log" 2>&1  # DataLoader workers hand batches over through it
      run_bounded 480 "$OUT/train_e2e.log" $PY benchmarks/bench_e2e.py --out "$OUT/train_e2e" \
        --parts "${TRAIN_E2E_PARTS:-train,memory,infer}" || status=1
      tail -30 "$OUT/train_e2e.log"
      ;;
    summary)
      cat "$OUT/sanitize_summary.txt" 2>/dev/null
      grep -h -E "passed|failed" "$OUT/pytest.log" 2>/dev/null | tail -1
      for b in rope_attention l1_prune; do
        [ -f "$OUT/bench_$b.log" ] && { echo "--- $b"; tail -12 "$OUT/bench_$b.log"; }
      done
      [ -f "$OUT/e2e.log" ] && sed -n '/=== summary ===/,$p' "$OUT/e2e.log"
      [ -f "$OUT/tower.log" ] && { echo "--- tower"; sed -n '/=== summary ===/,$p' "$OUT/tower.log"; }
      [ -f "$OUT/train_e2e.log" ] && { echo "--- training"; sed -n '/=== summary ===/,$p' "$OUT/train_e2e.log"; }
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "--- $step took $(( $(date +%s) - step_start )) s" | tee -a "$OUT/steps.txt"
done
exit $status
