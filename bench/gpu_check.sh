#!/bin/bash
# On a GPU machine: build dspark._C with the CUDA kernels, then run the GPU tests one file and one
# backend per process (an illegal memory access poisons the CUDA context of the whole process, so a
# crash in one kernel must not fail the others). Logs go to ${OUT:-/tmp/gpu-check}.
#   bench/gpu_check.sh [build|tests|all|sanitize|fuzz|engine]   (DSPARK_CUDA_ARCHS=90a builds for the H100/H200 only)
#   BACKENDS="cuda" restricts the tests; `sanitize` runs compute-sanitizer memcheck and racecheck over
#   the CUDA backend's kernel tests, with torch's caching allocator off so out-of-bounds accesses are seen.
set -u
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
what=${1:-all}
if [ "$what" = build ] || [ "$what" = all ]; then
  start=$(date +%s)
  if ! MAX_JOBS=${MAX_JOBS:-16} DSPARK_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . \
      >"$OUT/build.log" 2>&1; then
    echo "CUDA build failed (log: build.log); building the CPU-only extension"; tail -40 "$OUT/build.log"
    DSPARK_CUDA=0 python3 -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 || exit 1
  fi
  echo "build: $(( $(date +%s) - start )) s; with_cuda=$(python3 -c 'import dspark._C as c; print(c.with_cuda)')"
fi
[ "$what" = build ] && exit 0
if [ "$what" = engine ]; then
  # The Engine on the GPU (bench/engine_check.py): greedy identity, a sampled smoke test, tokens/s.
  timeout "${ENGINE_TIMEOUT:-420}" python3 bench/engine_check.py --device cuda --out "$OUT/engine-check.json" \
    >"$OUT/engine-check.log" 2>&1
  echo "engine rc=$? $(tail -3 "$OUT/engine-check.log" | tr '\n' ' ')"
  exit 0
fi
if [ "$what" = fuzz ]; then
  # The op fuzzer on CUDA tensors (tests/opfuzz): FUZZ_CASES per op for Triton and CUDA, then the CUDA
  # backend again under compute-sanitizer memcheck at a smaller budget. Summaries: fuzz-*.json.
  for backend in triton cuda; do
    DSPARK_TRITON_AUTOTUNE=0 timeout "${FUZZ_TIMEOUT:-300}" python3 tests/opfuzz/runner.py --device cuda \
      --backends $backend --cases "${FUZZ_CASES:-300}" --jobs 2 --slices 2 --json "$OUT/fuzz-$backend.json" \
      >"$OUT/fuzz-$backend.log" 2>&1
    echo "fuzz $backend rc=$? $(tr -d '\n ' < "$OUT/fuzz-$backend.json" 2>/dev/null | grep -o '"outcomes":{[^}]*}[^}]*}[^}]*}')"
  done
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck \
    --error-exitcode 9 python3 tests/opfuzz/runner.py --device cuda --backends cuda --cases "${SANITIZE_CASES:-60}" \
    --jobs 1 --timeout 120 --json "$OUT/fuzz-cuda-memcheck.json" >"$OUT/fuzz-cuda-memcheck.log" 2>&1
  echo "fuzz cuda memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/fuzz-cuda-memcheck.log" | sort | uniq -c | tr '\n' ' ')"
  exit 0
fi
if [ "$what" = sanitize ]; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool $tool \
      --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider --tb=short -k "cuda" \
      tests/test_tree_attention.py tests/test_rejection_sample.py tests/test_kv_rollback.py >"$OUT/sanitize-$tool.log" 2>&1
    echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize-$tool.log" | tail -2 | tr '\n' ' ')"
  done
  exit 0
fi
files="tests/test_tree_attention.py tests/test_rejection_sample.py tests/test_rejection_sample_distribution.py
       tests/test_kv_rollback.py tests/test_custom_ops.py tests/test_validation.py tests/test_op_regressions.py"
for backend in ${BACKENDS:-triton cuda}; do
  for f in $files; do
    name=$(basename "$f" .py)
    DSPARK_TRITON_AUTOTUNE=0 PYTHONUNBUFFERED=1 timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider --tb=short \
      -k "$backend" "$f" >"$OUT/$backend-$name.log" 2>&1
    echo "$backend $name rc=$? $(tail -1 "$OUT/$backend-$name.log")"
  done
done
