#!/usr/bin/env bash
# Everything a GPU session needs, in one call (the device tool gives ~30 min):
#   build (editable, no deps: the GPU machine has torch but no internet),
#   the full test suite (CUDA-parametrized tests run there),
#   compute-sanitizer memcheck / racecheck / initcheck on a small CUDA case,
#   the GPU benchmark presets.
# Results go to $OUT (the device tool's folder) or bench/out/gpu-<date>/.
#   bash bench/gpu_check.sh            # all steps
#   STEPS="build tests" bash bench/gpu_check.sh     (steps: build tests sanitize bench ncu)
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-bench/out/gpu-$(date +%F)}
mkdir -p "$RES"
STEPS=${STEPS:-"build tests sanitize bench"}
PY=${PY:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST
fi
log() { echo "== $(date +%T) $*" | tee -a "$RES/summary.txt"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  git rev-parse --short HEAD 2>/dev/null
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"

for step in $STEPS; do
  case $step in
    build)
      log "build (arch $TORCH_CUDA_ARCH_LIST)"
      FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1
      log "build rc=$?"
      "$PY" -c "import tubevit_ext as tv; print('cuda kernels built:', tv.cuda_compiled())" 2>&1 | tee -a "$RES/summary.txt" ;;
    tests)
      log "tests (default CUDA path: naive kernels)"
      "$PY" -m pytest python_tests -q --maxfail=25 -p no:cacheprovider -rfE > "$RES/tests.log" 2>&1
      log "tests rc=$? :: $(tail -n 1 "$RES/tests.log")"
      # the opt-in tensor-core forward (fp16/bf16, sm_80+): same suite
      log "tests with TUBEVIT_CUDA_TC=1"
      TUBEVIT_CUDA_TC=1 "$PY" -m pytest python_tests -q --maxfail=25 -p no:cacheprovider -rfE -k "cuda" > "$RES/tests-tc.log" 2>&1
      log "tests-tc rc=$? :: $(tail -n 1 "$RES/tests-tc.log")" ;;
    sanitize)
      for tool in memcheck racecheck initcheck; do
        log "compute-sanitizer $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/sanitize_case.py > "$RES/sanitizer-$tool.log" 2>&1
        log "$tool rc=$? :: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RES/sanitizer-$tool.log" | tail -n 1)"
        TUBEVIT_CUDA_TC=1 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" bench/sanitize_case.py > "$RES/sanitizer-tc-$tool.log" 2>&1
        log "$tool (tensor-core) rc=$? :: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RES/sanitizer-tc-$tool.log" | tail -n 1)"
      done ;;
    ncu)
      # kernel-level profile of one paper-tube forward (bf16, B=8), both paths
      for tc in 0 1; do
        log "ncu (TUBEVIT_CUDA_TC=$tc)"
        TUBEVIT_CUDA_TC=$tc ncu --set full -k regex:tube -c 4 -o "$RES/ncu-tc$tc" "$PY" -c "
import torch, tubevit_ext as tv
m = tv.SparseTubeTokenizer(3, 768).cuda().bfloat16()
x = torch.randn(8, 3, 32, 224, 224, device='cuda', dtype=torch.bfloat16)
with torch.no_grad():
    for _ in range(2): m(x)
torch.cuda.synchronize()" > "$RES/ncu-tc$tc.log" 2>&1
        log "ncu rc=$?"
      done ;;
    bench)
      for preset in gpu-targets; do
        log "bench $preset"
        "$PY" bench/tube_bench.py --preset "$preset" --json "$RES/bench-$preset.json" > "$RES/bench-$preset.txt" 2>"$RES/bench-$preset.err"
        log "bench rc=$?"
        tail -n 12 "$RES/bench-$preset.txt" | tee -a "$RES/summary.txt"
        TUBEVIT_CUDA_TC=1 "$PY" bench/tube_bench.py --preset "$preset" --json "$RES/bench-tc-$preset.json" > "$RES/bench-tc-$preset.txt" 2>"$RES/bench-tc-$preset.err"
        log "bench (tensor-core) rc=$?"
        tail -n 12 "$RES/bench-tc-$preset.txt" | tee -a "$RES/summary.txt"
      done ;;
  esac
done
log "done"
