#!/usr/bin/env bash
# Every GPU check in ONE run of the device machine (10 min a command, 15 min of device time in all,
# machine start included), most valuable first, inside BUDGET_S (default 480):
#   build     use the carried build (tubevit_ext/_C.cpython-312-*.so from .ci/check_gpu_torch, built
#             with the prototype) when it imports and runs a kernel here, else build the product here
#   tests     the suite's CUDA parametrization (-k cuda), each test file in its own process under
#             pytest-timeout (a hung kernel costs its test, not the run), four files at a time
#   sanitize  compute-sanitizer memcheck, racecheck and initcheck on bench/sanitize_case.py, once per
#             product path (TUBEVIT_CUDA_PATH=gemm, tc, naive)
#   bench     bench/tube_bench.py --preset gpu-targets (reference, unfold + cuBLAS, the library), JSON + PNG
#   e2e       bench/e2e_bench.py: TubeViT-B with our tokenizer vs the Conv3d one, bf16 and fp32 autocast
#             (the train command's step, data excluded), B = 8 and 32
#   prototype first light of csrc/prototype (only where the build has it): its CUDA tests, then the
#             suite's CUDA tests under TUBEVIT_CUDA_PATH=hopper, memcheck / racecheck / synccheck of
#             the Hopper path, and its bench rows against the product in the same run
# A step starts only if its estimate fits what is left, and runs under `timeout` with what is
# left, so a killed call still returns results. $OUT gets three files: summary.txt (one line per
# step, failing test names, target lines), results.tar.gz (JSON, PNG) and logs.tar.gz.
# Usage (device tool, timeout_s=600):  TUBEVIT_COMMIT=<sha> bash bench/gpu_check.sh
#   STEPS="tests bench" BUDGET_S=300 PY=python3 FILE_JOBS=4
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
RES=${OUT:-bench/out/gpu-$(date +%F)}
LOGS=$(mktemp -d)
DATA=$(mktemp -d)
mkdir -p "$RES"
STEPS=${STEPS:-"build tests sanitize bench e2e prototype"}
PY=${PY:-$(command -v python3 || command -v python)}
export PY PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
TIMEOUT_OPT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120 --timeout-method=thread")
export TIMEOUT_OPT
SUMMARY="$RES/summary.txt"
log() { echo "== $(date +%T) +$(( $(date +%s) - START ))s $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
pack() { tar -czf "$RES/results.tar.gz" -C "$DATA" . 2>/dev/null; tar -czf "$RES/logs.tar.gz" -C "$LOGS" . 2>/dev/null; }
proto() { "$PY" -c "import sys, tubevit_ext as tv; sys.exit(0 if tv._C._prototype_compiled() else 1)" 2>/dev/null; }

# run_step NAME ESTIMATE_S CMD...: skipped when less than the estimate is left
run_step() {
  local name=$1 est=$2 rem rc; shift 2
  rem=$(left)
  if [ "$rem" -lt "$est" ]; then log "$name SKIPPED (needs ~${est}s, ${rem}s left)"; return 0; fi
  log "$name (timeout ${rem}s)"
  timeout --kill-after=5 "$rem" bash -c "$(declare -f by_file sanitize); \"\$@\"" _ "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  log "$name rc=$rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)') :: $(grep -E 'passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|^by file' "$LOGS/$name.log" | tail -n 1)"
  grep -E "^(FAILED|ERROR) " "$LOGS/$name.log" | head -n 25 | cut -c1-300 | tee -a "$SUMMARY"
  pack
  return $rc
}
# by_file DIR ARGS...: the CUDA tests under DIR, one process per file, FILE_JOBS at a time, each with
# nproc / FILE_JOBS CPU threads (the fp64 references run on the CPU); one summary line at the end
by_file() {
  local root=$1 f r passed=0 failed=0 bad="" tmp threads; shift
  tmp=$(mktemp -d)
  threads=$(( $(nproc) / ${FILE_JOBS:-4} )); [ "$threads" -ge 1 ] || threads=1
  local files; files=$("$PY" -m pytest "$root" --collect-only -q -k cuda -p no:cacheprovider 2>/dev/null \
    | grep -oE "^[A-Za-z0-9_/]+/test_[A-Za-z0-9_]+\.py" | sort -u)
  for f in $files; do
    while [ "$(jobs -rp | wc -l)" -ge "${FILE_JOBS:-4}" ]; do wait -n; done
    ( OMP_NUM_THREADS=$threads "$PY" -m pytest "$f" -q -k cuda -p no:cacheprovider -rfE $TIMEOUT_OPT "$@" \
        > "$tmp/$(basename "$f").log" 2>&1; echo $? > "$tmp/$(basename "$f").rc" ) &
  done
  wait
  for f in $files; do
    f=$(basename "$f"); cat "$tmp/$f.log"; r=$(cat "$tmp/$f.rc" 2>/dev/null || echo 99)
    passed=$((passed + $(grep -oE "[0-9]+ passed" "$tmp/$f.log" | tail -n 1 | grep -oE "^[0-9]+" || echo 0)))
    failed=$((failed + $(grep -oE "[0-9]+ failed" "$tmp/$f.log" | tail -n 1 | grep -oE "^[0-9]+" || echo 0)))
    if [ "$r" -ne 0 ] && [ "$r" -ne 5 ]; then bad="$bad $f(rc=$r)"; fi
  done
  echo "by file: $(echo "$files" | wc -w) files, $passed passed, $failed failed${bad:+; failing:$bad}"
  [ -z "$bad" ]
}
# sanitize TOOL PATH...: one compute-sanitizer run of bench/sanitize_case.py per CUDA path
sanitize() {
  local tool=$1 p; shift
  for p in "$@"; do
    echo "-- $tool, TUBEVIT_CUDA_PATH=$p"
    TUBEVIT_CUDA_PATH=$p compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/sanitize_case.py || return $?
  done
}
bench() {  # bench JSON_NAME ARGS...
  local json=$1; shift
  "$PY" bench/tube_bench.py --preset gpu-targets --json "$DATA/$json" --plot "$DATA/${json%.json}.png" "$@"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "commit ${TUBEVIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}, budget ${BUDGET_S}s, steps: $STEPS"
} > "$SUMMARY" 2>&1
cat "$SUMMARY"

for step in $STEPS; do
  case $step in
    build)
      if "$PY" -c "
import torch, tubevit_ext as tv
assert tv.cuda_compiled()
t = [tv.Tube((2, 3, 3), (2, 2, 2))]
x = torch.randn(1, 3, 5, 7, 7, device='cuda'); w = [torch.randn(4, 3, 2, 3, 3, device='cuda')]
r = tv.reference.tube_tokens(x.double(), [w[0].double()], None, t, None)
assert (tv.tube_tokens(x, w, None, t).double() - r).abs().max().item() < 1e-3
print('carried build works:', tv._C.__file__, 'prototype:', tv._C._prototype_compiled())" 2>&1 | tee -a "$SUMMARY" \
        | grep -q "carried build works"; then
        continue
      fi
      run_step build 90 env FORCE_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST=9.0 \
        "$PY" -m pip install --no-build-isolation --no-deps -e . ;;
    tests)
      run_step tests 90 by_file python_tests ;;
    sanitize)
      for tool in memcheck racecheck initcheck; do run_step "$tool" 40 sanitize "$tool" gemm tc naive; done ;;
    bench)
      run_step bench 120 bench bench.json --impls reference unfold_gemm fused fused_gemm fused_tc
      grep -E "target|matmul peak" "$LOGS/bench.log" | tee -a "$SUMMARY" ;;
    e2e)
      run_step e2e 180 "$PY" bench/e2e_bench.py --sizes b --batch 8 32 --frames 32 --repeats 5 --precision bf16 fp32 \
        --json "$DATA/e2e.json" --plot "$DATA/e2e.png"
      grep -E "^b " "$LOGS/e2e.log" | tee -a "$SUMMARY" ;;
    prototype)
      if ! proto; then log "prototype SKIPPED: this build has no csrc/prototype"; continue; fi
      run_step prototype-tests 40 by_file csrc/prototype
      TUBEVIT_CUDA_PATH=hopper run_step prototype-suite 90 by_file python_tests
      for tool in memcheck racecheck synccheck; do run_step "prototype-$tool" 30 sanitize "$tool" hopper; done
      run_step prototype-bench 60 bench prototype-bench.json --impls unfold_gemm fused fused_hopper \
        --dtypes bfloat16 --modes fwd fwd_bwd fwd_bwd_input --batch 1 8 32
      grep -E "target|matmul peak" "$LOGS/prototype-bench.log" | tee -a "$SUMMARY" ;;
    *) log "unknown step $step" ;;
  esac
done
log "done"
pack
