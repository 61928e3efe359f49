#!/usr/bin/env bash
# Every GPU check in ONE run of the device machine, most valuable first,
# inside a wall-clock budget (the device tool allows 10 min per command and
# 15 min of device time in all, machine start included):
#   build          editable install, no deps (no internet there), this GPU's arch only
#   probe          bench/kernel_probe.py: each kernel family's passes on small cases, each in its own
#                  process under a 40 s watchdog, all at once: ok / wrong (with a fingerprint of where) / hang /
#                  error / routing, into the summary. A family that hung (mma, hopper) has its CUDA
#                  tests deselected (-k "cuda and not cuda_<family>") and its own steps skipped, so
#                  one deadlocked pipeline cannot eat the run (PROBE_ARGS: more arguments for it)
#   glimpse        the speed targets in one short benchmark, before the long steps: bf16 B = 32, fwd,
#                  fwd_bwd, fwd_bwd_input; reference, unfold + cuBLAS, the library's choice, the WMMA,
#                  mma and Hopper kernels (less the families whose probe hung); target lines into the
#                  summary (glimpse.json)
#   tests          CUDA-parametrized tests, default paths (by size)   (-k cuda); every tests* step runs
#                  each test file in its own process under a watchdog (FILE_TIMEOUT_S, default 150),
#                  so a hung kernel costs its file, not the step
#   tests-gemm     the same on the GEMM path wherever it applies      (TUBEVIT_CUDA_PATH=gemm)
#   tests-optin    the GEMM path with its opt-in kernels (TUBEVIT_CUDA_PATH=gemm TUBEVIT_GEMM_GATHER_VEC=1
#                  TUBEVIT_DX_PASS=scatter: V-wide gather, per-tube dX scatter), then the tensor-core
#                  path with the dx writer (TUBEVIT_CUDA_PATH=tc TUBEVIT_DX_PASS=writer)
#   tests-tc       the same on the handwritten tensor-core kernels      (TUBEVIT_CUDA_PATH=tc)
#   tests-hopper   the same with the opt-in sm_90a wgmma kernels (TUBEVIT_CUDA_PATH=hopper: forward, dW,
#                  db, dP + the dx writer), then bf16 forward, forward + backward and forward +
#                  backward with the input gradient at B = 1, 8, 32 against unfold + cuBLAS and the
#                  GEMM path, same run
#   tests-mma      the same with the opt-in ldmatrix + mma.sync forward and dW (TUBEVIT_CUDA_PATH=tc
#                  TUBEVIT_TC_MMA=1), then bf16 forward and forward + backward at B = 1, 8, 32: fused_mma
#                  vs fused_tc (the WMMA kernels) vs unfold + cuBLAS, same run; then memcheck, racecheck
#                  and synccheck of them
#   tests-naive    the same with the naive kernels                      (TUBEVIT_CUDA_PATH=naive)
#   memcheck       compute-sanitizer memcheck on bench/sanitize_case.py, all paths
#                  (GEMM forced, tensor-core kernels, naive, and the Hopper kernels where built)
#   sanitize-hopper memcheck, racecheck, synccheck and initcheck of the Hopper kernels alone
#   bench          --preset gpu-targets without torch.compile (JSON kept)
#   bench-tc       the fused rows of it on the tensor-core kernels      (TUBEVIT_CUDA_PATH=tc)
#   bench-small    B = 1 and 4: reference, unfold_gemm, fused on both fast paths
#   bench-paths    B = 1, 4, 8, 16, 32: reference, unfold_gemm, fused (default choice),
#                  fused_gemm and fused_tc (each path forced), interleaved in one run
#   bench-gather   the GEMM path at B = 8, 32 with the scalar and the V-wide gather
#   bench-dx       bf16 fwd_bwd_input at B = 8 and 32, both fast paths and unfold + cuBLAS: the dX gather
#                  vs the per-tube scatter vs the writer (TUBEVIT_DX_PASS)
#   bench-naive    optional: the same on the naive kernels (slow: ~60 ms a forward)
#   racecheck      compute-sanitizer racecheck, all three paths
#   initcheck      compute-sanitizer initcheck, all three paths
#   bench-compile  compiled_reference vs reference vs fused (compiling is slow)
#   bench-host     host overhead on CUDA (bench/host_overhead.py) and bf16 forwards B = 1 .. 32 with
#                  one call between events, back-to-back calls, kernel time and CUDA-graph replay
#   bench-e2e      TubeViT-B with our tokenizer vs the Conv3d tokenizer, bf16, B = 8 and 32,
#                  training step and inference (bench/e2e_bench.py; e2e.json)
#   tests-all      the whole suite, CPU tests included (CI covers those too)
#   profile        optional: torch.profiler kernel tables (bench/gpu_profile.py)
#   profile-host   optional: host-side op tables at B = 4, GEMM path and tensor-core kernels
#   variants       optional: fused bench + kernel table for each build carried
#                  as .variants/NAME.so (tuning variants, a baseline commit);
#                  VARIANT_TESTS="NAME ..." runs the CUDA tests on those first
#   ncu            optional: Nsight Compute text report of one bf16 forward + backward
#   ncu-hopper     Nsight Compute report of the Hopper kernels and the dx writer (bf16, B = 32),
#                  ncu-hopper.txt
#   ncu-mma        optional: the same for the ldmatrix + mma.sync forward and dW, ncu-mma.txt
# A step starts only if the budget still holds its estimate, and runs under
# `timeout` with what is left, so a killed call still returns its results.
#
# The device tool returns at most 8 files from $OUT; this script writes three, refreshed after
# each step: summary.txt (env, one line per step, the probe's table, target checks),
# results.tar.gz (the JSON, plots and reports: probe.json, bench-*.json, e2e.json, ncu-*.txt, ...)
# and logs.tar.gz (every step's log).
# Usage (device tool):  TUBEVIT_COMMIT=<short sha> bash bench/gpu_check.sh   with timeout_s=600
#   (the device's copy of .git may be older than the tree it runs, so name the commit)
#   BUDGET_S=540 (default)  STEPS="build tests bench"  PY=python3
# A build carried from the CPU machine (tubevit_ext/_C.cpython-312-*.so made by
# .ci/check_gpu_torch against the same Python 3.12 + torch 2.11.0, name it in
# the device call's `carry`) is used when it imports, has the CUDA kernels and
# runs one on this GPU; otherwise the build step compiles here (~1 min).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
RES=${OUT:-bench/out/gpu-$(date +%F)}
LOGS=$(mktemp -d)
DATA=$(mktemp -d)
mkdir -p "$RES"
STEPS=${STEPS:-"build probe glimpse tests tests-hopper sanitize-hopper tests-mma bench-dx ncu-hopper bench-host bench-e2e memcheck bench racecheck initcheck"}
PY=${PY:-$(command -v python3 || command -v python)}
export PY RES LOGS DATA PYTHONUNBUFFERED=1
# the repo root on the path: the carried build is used without an install
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# a hung kernel must cost one test, not the step (pytest-timeout is on the machine)
TIMEOUT_OPT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
export TIMEOUT_OPT
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c == (9, 0) else ''))" 2>/dev/null || echo 9.0a)
  export TORCH_CUDA_ARCH_LIST
fi
SUMMARY="$RES/summary.txt"
log() { echo "== $(date +%T) +$(( $(date +%s) - START ))s $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# $OUT holds three files (the device tool returns at most 8): summary.txt, results.tar.gz (every
# JSON, plot and report the steps write, under $DATA) and logs.tar.gz (every step's log)
pack() { tar -czf "$RES/results.tar.gz" -C "$DATA" . 2>/dev/null; tar -czf "$RES/logs.tar.gz" -C "$LOGS" . 2>/dev/null; }
# probe_status FAMILY: what the probe step found for a kernel family (unknown before or without it)
probe_status() { sed -n "s/^PROBE_$1=//p" "$LOGS/probe.env" 2>/dev/null | grep . || echo unknown; }
hung() { [ "$(probe_status "$1")" = hang ]; }
# the CUDA tests pytest_by_file selects: all, less the families whose probe hung
KEXPR=cuda
export KEXPR
# skip_hung FAMILY STEP: true (and logged) when the family's probe hung
skip_hung() { hung "$1" && log "$2 SKIPPED: the $1 kernels hung in the probe (summary above)"; }
# run_step NAME ESTIMATE_S CMD...: skipped when less than the estimate is left
run_step() {
  local name=$1 est=$2; shift 2
  local rem; rem=$(left)
  if [ "$rem" -lt "$est" ]; then log "$name SKIPPED (needs ~${est}s, ${rem}s left)"; return 0; fi
  log "$name (timeout ${rem}s)"
  # shell functions run through bash -c (timeout only runs programs)
  timeout --kill-after=5 "$rem" bash -c "$(declare -f sanitize bench pytest_by_file probe_status hung); \"\$@\"" _ "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)') :: $(grep -E 'passed|failed|skipped|ERROR SUMMARY|RACECHECK SUMMARY|rror|^by file' "$LOGS/$name.log" | tail -n 1)"
  # failing test names into the summary (the device reply carries its tail)
  grep -E "^(FAILED|ERROR) " "$LOGS/$name.log" | head -n 25 | cut -c1-300 | tee -a "$SUMMARY"
  pack
  return $rc
}
# pytest_by_file ARGS...: the CUDA tests (-k "$KEXPR": cuda, less the families whose probe hung), one
# process per test file that has any (the list
# collected once per run), FILE_JOBS (6) files at a time, each under a watchdog of FILE_TIMEOUT_S (150 s)
# and with nproc / FILE_JOBS CPU threads (the fp64 references run on the CPU; 16 threads in each of six
# processes would oversubscribe the cores);
# then each file's log and one summary line; the step fails if any file does (rc 5: nothing selected)
pytest_by_file() {
  local f r dir passed=0 failed=0 files=0 bad=""
  if [ ! -s "$LOGS/cuda-test-files" ]; then
    "$PY" -m pytest python_tests --collect-only -q -k "$KEXPR" -p no:cacheprovider 2>/dev/null \
      | grep -oE "^python_tests/test_[A-Za-z0-9_]+\.py" | sort -u > "$LOGS/cuda-test-files"
  fi
  dir=$(mktemp -d)
  local threads=$(( $(nproc) / ${FILE_JOBS:-6} ))
  [ "$threads" -ge 1 ] || threads=1
  for f in $(cat "$LOGS/cuda-test-files"); do
    while [ "$(jobs -rp | wc -l)" -ge "${FILE_JOBS:-6}" ]; do wait -n; done
    ( OMP_NUM_THREADS=$threads timeout --kill-after=5 "${FILE_TIMEOUT_S:-150}" "$PY" -m pytest "$f" -q -k "$KEXPR" -p no:cacheprovider -rfE \
        $TIMEOUT_OPT "$@" > "$dir/$(basename "$f").log" 2>&1
      echo $? > "$dir/$(basename "$f").rc" ) &
  done
  wait
  for f in $(cat "$LOGS/cuda-test-files"); do
    f=$(basename "$f")
    cat "$dir/$f.log"
    r=$(cat "$dir/$f.rc" 2>/dev/null || echo 99)
    files=$((files + 1))
    passed=$((passed + $(grep -oE "[0-9]+ passed" "$dir/$f.log" | tail -n 1 | grep -oE "^[0-9]+" || echo 0)))
    failed=$((failed + $(grep -oE "[0-9]+ failed" "$dir/$f.log" | tail -n 1 | grep -oE "^[0-9]+" || echo 0)))
    if [ "$r" -ne 0 ] && [ "$r" -ne 5 ]; then bad="$bad $f(rc=$r$([ "$r" -eq 124 ] && echo ',watchdog'))"; fi
  done
  rm -rf "$dir"
  echo "by file: $files files, $passed passed, $failed failed${bad:+; failing:$bad}"
  [ -z "$bad" ]
}
sanitize() {  # sanitize TOOL: GEMM path (default, and with the opt-in kernels), tensor-core kernels, naive kernels
  TUBEVIT_CUDA_PATH=gemm compute-sanitizer --tool "$1" --error-exitcode 9 "$PY" bench/sanitize_case.py || return $?
  TUBEVIT_CUDA_PATH=gemm TUBEVIT_GEMM_GATHER_VEC=1 TUBEVIT_DX_PASS=scatter compute-sanitizer --tool "$1" --error-exitcode 9 "$PY" bench/sanitize_case.py || return $?
  TUBEVIT_CUDA_PATH=tc compute-sanitizer --tool "$1" --error-exitcode 9 "$PY" bench/sanitize_case.py || return $?
  TUBEVIT_CUDA_PATH=tc TUBEVIT_DX_PASS=writer compute-sanitizer --tool "$1" --error-exitcode 9 "$PY" bench/sanitize_case.py || return $?
  TUBEVIT_CUDA_PATH=naive compute-sanitizer --tool "$1" --error-exitcode 9 "$PY" bench/sanitize_case.py || return $?
  # the opt-in Hopper kernels, where this build has their sm_90a code and their probe did not hang
  if ! hung hopper && "$PY" -c "import sys, tubevit_ext as tv; sys.exit(0 if tv._C._hopper_compiled() else 1)"; then
    TUBEVIT_CUDA_PATH=hopper compute-sanitizer --tool "$1" --error-exitcode 9 "$PY" bench/sanitize_case.py
  fi
}
bench() {  # bench JSON_NAME ARGS...: table into the log, targets into the summary
  local json=$1; shift
  "$PY" bench/tube_bench.py --preset gpu-targets --json "$DATA/$json" --plot "$DATA/${json%.json}.png" "$@"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  echo "commit ${TUBEVIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) files changed)}"
  echo "arch $TORCH_CUDA_ARCH_LIST, budget ${BUDGET_S}s, steps: $STEPS"
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
b = [torch.randn(4, device='cuda')]
import tubevit_ext.testing
y = torch.ops.tubevit_testing.tube_tokens_naive(x, w, b, tv.flatten_tubes(t), None)
r = tv.reference.tube_tokens(x.double(), [w[0].double()], [b[0].double()], t, None)
assert (y.double() - r).abs().max().item() < 1e-4
print('carried build works:', tv._C.__file__)" 2>&1 | tee -a "$SUMMARY" | grep -q "carried build works"; then
        log "build skipped: the carried build works on this GPU"; continue
      fi
      run_step build 60 env FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        || { log "build failed: stopping"; break; }
      "$PY" -c "import tubevit_ext as tv; print('cuda kernels built:', tv.cuda_compiled())" 2>&1 | tee -a "$SUMMARY" ;;
    probe)
      run_step probe 45 "$PY" bench/kernel_probe.py --timeout 40 --jobs 9 ${PROBE_ARGS:-} --json "$DATA/probe.json" --env "$LOGS/probe.env"
      grep -vE "^==|^$" "$LOGS/probe.log" | head -n 60 | cut -c1-400 | tee -a "$SUMMARY"
      for fam in mma hopper; do hung $fam && KEXPR="$KEXPR and not cuda_$fam"; done
      [ "$KEXPR" != cuda ] && log "CUDA tests selected by -k \"$KEXPR\""
      rm -f "$LOGS/cuda-test-files" ;;
    glimpse)
      impls="reference unfold_gemm fused fused_tc"
      hung mma || impls="$impls fused_mma"
      hung hopper || impls="$impls fused_hopper"
      log "glimpse impls: $impls"
      run_step glimpse 60 bench glimpse.json --impls $impls --dtypes bfloat16 --batch 32 --repeats 10 --rounds 1
      grep -E "^paper|target|matmul peak" "$LOGS/glimpse.log" | sed "s/^/glimpse: /" | tee -a "$SUMMARY" ;;
    tests)
      run_step tests 60 pytest_by_file ;;
    tests-gemm)
      TUBEVIT_CUDA_PATH=gemm run_step tests-gemm 60 pytest_by_file ;;
    tests-optin)
      TUBEVIT_CUDA_PATH=gemm TUBEVIT_GEMM_GATHER_VEC=1 TUBEVIT_DX_PASS=scatter run_step tests-optin 60 pytest_by_file
      TUBEVIT_CUDA_PATH=tc TUBEVIT_DX_PASS=writer run_step tests-optin-tc 60 pytest_by_file ;;
    tests-hopper)
      # the opt-in sm_90a wgmma kernels, and their rows of the benchmark
      skip_hung hopper tests-hopper && continue
      TUBEVIT_CUDA_PATH=hopper run_step tests-hopper 60 pytest_by_file
      run_step bench-hopper 60 bench bench-hopper.json --impls unfold_gemm fused_gemm fused_hopper \
        --dtypes bfloat16 --modes fwd fwd_bwd fwd_bwd_input --batch 1 8 32
      grep -E "^paper" "$LOGS/bench-hopper.log" | sed "s/^/hopper: /" | tee -a "$SUMMARY" ;;
    tests-tc)
      TUBEVIT_CUDA_PATH=tc run_step tests-tc 60 pytest_by_file ;;
    tests-mma)
      # the opt-in ldmatrix + mma.sync forward: tests, its benchmark rows, the sanitizers on it alone
      skip_hung mma tests-mma && continue
      TUBEVIT_CUDA_PATH=tc TUBEVIT_TC_MMA=1 run_step tests-mma 60 pytest_by_file
      run_step bench-mma 50 bench bench-mma.json --impls unfold_gemm fused_tc fused_mma \
        --dtypes bfloat16 --modes fwd fwd_bwd --batch 1 8 32
      grep -E "^paper|fused_mma" "$LOGS/bench-mma.log" | sed "s/^/mma: /" | tee -a "$SUMMARY"
      for tool in memcheck racecheck synccheck; do
        TUBEVIT_CUDA_PATH=tc TUBEVIT_TC_MMA=1 run_step "mma-$tool" 20 compute-sanitizer --tool "$tool" \
          --error-exitcode 9 "$PY" bench/sanitize_case.py
      done ;;
    tests-naive)
      TUBEVIT_CUDA_PATH=naive run_step tests-naive 60 pytest_by_file ;;
    memcheck|racecheck|initcheck|synccheck)
      run_step "$step" 60 sanitize "$step" ;;
    sanitize-hopper)
      # the opt-in Hopper kernels alone under every tool (their mbarrier pipelines: racecheck, synccheck)
      skip_hung hopper sanitize-hopper && continue
      for tool in memcheck racecheck synccheck initcheck; do
        TUBEVIT_CUDA_PATH=hopper run_step "hopper-$tool" 30 compute-sanitizer --tool "$tool" --error-exitcode 9 \
          "$PY" bench/sanitize_case.py
      done ;;
    bench)
      run_step bench-default 90 bench bench-default.json --impls reference unfold_gemm fused
      grep -E "target|peak|fused" "$LOGS/bench-default.log" | tee -a "$SUMMARY" ;;
    bench-tc)
      TUBEVIT_CUDA_PATH=tc run_step bench-tc 90 bench bench-tc.json --impls fused
      grep -E "^paper" "$LOGS/bench-tc.log" | sed "s/^/tc: /" | tee -a "$SUMMARY" ;;
    bench-small)
      # small batches, where launch counts matter: both fast paths, same run
      run_step bench-small 60 bench bench-small.json --impls reference unfold_gemm fused --batch 1 4
      grep -E "^paper" "$LOGS/bench-small.log" | tee -a "$SUMMARY"
      TUBEVIT_CUDA_PATH=tc run_step bench-small-tc 40 bench bench-small-tc.json --impls fused --batch 1 4
      grep -E "^paper" "$LOGS/bench-small-tc.log" | sed "s/^/tc: /" | tee -a "$SUMMARY" ;;
    bench-paths)
      # both fast paths forced and the default choice, B = 1 .. 32, one process, interleaved
      # (the size thresholds of choose_path in csrc/cuda/tube_tokens_cuda.cu)
      run_step bench-paths 100 "$PY" bench/tube_bench.py --preset gpu-targets \
        --impls reference unfold_gemm fused fused_gemm fused_tc --batch 1 4 8 16 32 --rounds 2 \
        --json "$DATA/bench-paths.json" --plot "$DATA/bench-paths.png"
      grep -E "^paper" "$LOGS/bench-paths.log" | tee -a "$SUMMARY" ;;
    bench-gather)
      # the GEMM path with the scalar and the V-wide gather, same run (fused rows only)
      for g in 0 1; do
        run_step "bench-gather-$g" 30 env TUBEVIT_CUDA_PATH=gemm TUBEVIT_GEMM_GATHER_VEC=$g "$PY" bench/tube_bench.py \
          --preset gpu-targets --impls fused --batch 8 32 --json "$DATA/bench-gather-$g.json" --plot "$DATA/bench-gather-$g.png"
        grep -E "^paper" "$LOGS/bench-gather-$g.log" | sed "s/^/gather_vec=$g: /" | tee -a "$SUMMARY"
      done ;;
    bench-dx)
      # bf16 forward + backward with the input gradient, both fast paths (fused_gemm, fused_tc) and
      # unfold + cuBLAS: the dX gather vs the per-tube scatter vs the writer
      for g in gather scatter writer; do
        run_step "bench-dx-$g" 30 env TUBEVIT_DX_PASS=$g "$PY" bench/tube_bench.py \
          --preset gpu-targets --impls unfold_gemm fused_gemm fused_tc --dtypes bfloat16 --modes fwd_bwd_input \
          --batch 8 32 --json "$DATA/bench-dx-$g.json" --plot "$DATA/bench-dx-$g.png"
        grep -E "^paper" "$LOGS/bench-dx-$g.log" | sed "s/^/dx_pass=$g: /" | tee -a "$SUMMARY"
      done ;;
    bench-naive)
      TUBEVIT_CUDA_PATH=naive run_step bench-naive 90 bench bench-naive.json --impls reference unfold_gemm fused
      grep -E "target|peak" "$LOGS/bench-naive.log" | tee -a "$SUMMARY" ;;
    bench-compile)
      run_step bench-compile 150 bench bench-compile.json --impls reference fused compiled_reference --modes fwd
      grep -E "target" "$LOGS/bench-compile.log" | tee -a "$SUMMARY" ;;
    bench-host)
      # host vs device shares per call: the tiny-input host overhead table (bench/host_overhead.py),
      # then bf16 forwards B = 1 .. 32 with median_ms / pipelined_ms / kernel_ms / graph_ms
      run_step bench-host-tiny 40 "$PY" bench/host_overhead.py --device cuda --calls 1000 \
        --json "$DATA/host-overhead.json"
      grep -E "no_grad|require grad|backward" "$LOGS/bench-host-tiny.log" | tee -a "$SUMMARY"
      run_step bench-host 90 "$PY" bench/tube_bench.py --preset gpu-targets --impls reference unfold_gemm fused \
        --dtypes bfloat16 --modes fwd --batch 1 2 4 8 16 32 --repeats 20 --cuda-graph \
        --json "$DATA/bench-host.json" --plot "$DATA/bench-host.png"
      grep -E "^paper" "$LOGS/bench-host.log" | tee -a "$SUMMARY" ;;
    bench-e2e)
      run_step bench-e2e 150 "$PY" bench/e2e_bench.py --sizes b --batch 8 32 --frames 32 --repeats 5 \
        --json "$DATA/e2e.json" --plot "$DATA/e2e.png"
      grep -E "^b " "$LOGS/bench-e2e.log" | tee -a "$SUMMARY" ;;
    tests-all)
      run_step tests-all 90 "$PY" -m pytest python_tests -q -p no:cacheprovider -rfE $TIMEOUT_OPT ;;
    variants)
      # builds carried in .variants/NAME.so (e.g. other TUBEVIT_DEFINES, or an
      # earlier commit), each in turn in place of the main build: the fused
      # benchmark and the kernel table, same run, same card
      if ls .variants/*.so > /dev/null 2>&1; then
        so=$(ls tubevit_ext/_C.cpython-3*.so | head -n 1)
        cp "$so" "$LOGS/main.so"
        for v in .variants/*.so; do
          name=$(basename "$v" .so)
          cp "$v" "$so"
          # VARIANT_TESTS="NAME ...": the CUDA suite on those variants first
          # (~30 s each), for builds whose kernels no GPU has checked
          if [[ " ${VARIANT_TESTS:-} " == *" $name "* ]]; then
            run_step "variant-$name-tests" 45 "$PY" -m pytest python_tests -q -k cuda -p no:cacheprovider -rfE $TIMEOUT_OPT
          fi
          run_step "variant-$name" 30 bash -c "\"\$PY\" bench/tube_bench.py --preset gpu-targets --impls fused \
            --json \"\$DATA/variant-$name.json\" --plot \"\$DATA/variant-$name.png\" && \"\$PY\" bench/gpu_profile.py"
          grep -E "^paper" "$LOGS/variant-$name.log" | sed "s/^/$name: /" | tee -a "$SUMMARY"
        done
        cp "$LOGS/main.so" "$so"
      else
        log "variants: nothing in .variants/"
      fi ;;
    profile)
      run_step profile 40 bash -c '"$PY" bench/gpu_profile.py && "$PY" bench/gpu_profile.py --input-grad'
      cp "$LOGS/profile.log" "$DATA/profile.txt" ;;
    profile-host)
      # host-side op tables at B = 4 (where launch overhead decides), both fast paths forced
      run_step profile-host 50 bash -c 'TUBEVIT_CUDA_PATH=gemm "$PY" bench/gpu_profile.py --host --batch 4 --dtypes bf16 \
        && TUBEVIT_CUDA_PATH=tc "$PY" bench/gpu_profile.py --host --batch 4 --dtypes bf16'
      cp "$LOGS/profile-host.log" "$DATA/profile-host.txt" ;;
    ncu)
      # one bf16 forward + backward at B = 32: the tube kernels and the naive
      # ones (grid_stride_kernel); text report (clocks left as they are)
      run_step ncu 90 ncu --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        -k "regex:tube_|grid_stride" -c 8 "$PY" bench/gpu_profile.py --once bf16 --input-grad
      cp "$LOGS/ncu.log" "$DATA/ncu.txt" ;;
    ncu-hopper)
      skip_hung hopper ncu-hopper && continue
      # the Hopper kernels, bf16, B = 32 (gpu_profile.py --once --input-grad: one forward + backward):
      # forward, dW, its reduction, dP, the dx writer
      TUBEVIT_CUDA_PATH=hopper run_step ncu-hopper 60 ncu --clock-control none --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --kernel-name-base demangled -k "regex:hopper::|tube_dx_writer" -c 5 \
        "$PY" bench/gpu_profile.py --once bf16 --input-grad
      cp "$LOGS/ncu-hopper.log" "$DATA/ncu-hopper.txt" ;;
    ncu-mma)
      skip_hung mma ncu-mma && continue
      # optional: the ldmatrix + mma.sync forward and dW (with its reduction), bf16, B = 32
      TUBEVIT_CUDA_PATH=tc TUBEVIT_TC_MMA=1 run_step ncu-mma 50 ncu --clock-control none --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis -k "regex:_mma_" -c 3 "$PY" bench/gpu_profile.py --once bf16
      cp "$LOGS/ncu-mma.log" "$DATA/ncu-mma.txt" ;;
    *) log "unknown step $step" ;;
  esac
done
pack
log "done ($(left)s of the budget left)"
