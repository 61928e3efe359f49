#!/usr/bin/env bash
# Builds, on the CPU machine, what a run of bench/gpu_check.sh carries to the GPU machine
# (no device time is spent compiling there):
#   tubevit_ext/_C.cpython-312-*.so   the default build, for the GPU machine's
#                                     Python 3.12 + torch 2.11.0 (.venv-gpu-torch)
#   .variants/NAME.so                 the same tree built with other tuning knobs
#                                     (csrc/kernels/tc_tiles.h), stripped (~3 MB each)
# then prints the device call; gpu_check.sh's `variants` step times them side
# by side on one card.
#
# Usage: bash bench/prepare_gpu_variants.sh [NAME="DEFINES" ...]
#   default variants: base="" (the defaults) and single-stage="TUBEVIT_TC_STAGES=1
#   TUBEVIT_TC_DW_VEC=0" (the single-stage kernels with the transposing dW copy, a baseline)
# Every variant's tile code is checked by the emulator tests
# (python_tests/test_tc_emulation.py) before it is kept.
# Needs .venv-gpu-torch (bash .ci/check_gpu_torch creates it, ~3 min).
# Each build is a full rebuild (~1.5 min on 2 cores): the macros reach every file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-.venv-gpu-torch}
[ -x "$VENV/bin/python" ] || { echo "no $VENV: run bash .ci/check_gpu_torch first" >&2; exit 2; }
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-2}
if [ $# -eq 0 ]; then
  set -- base= "single-stage=TUBEVIT_TC_STAGES=1 TUBEVIT_TC_DW_VEC=0"
fi
so=tubevit_ext/_C.cpython-312-x86_64-linux-gnu.so
mkdir -p .variants
rm -f .variants/*.so
build() {  # build DEFINES: in-place build for the GPU machine's Python and torch
  TUBEVIT_DEFINES="$1" "$VENV/bin/python" setup.py build_ext --inplace > "/tmp/tubevit-variant-build.log" 2>&1 \
    || { tail -n 30 /tmp/tubevit-variant-build.log; exit 1; }
}
for spec in "$@"; do
  name=${spec%%=*}
  defines=${spec#*=}
  echo "building variant $name (TUBEVIT_DEFINES=\"$defines\")"
  build "$defines"
  "$VENV/bin/python" -m pytest python_tests/test_tc_emulation.py -q -p no:cacheprovider | tail -n 1
  strip --strip-debug -o ".variants/$name.so" "$so"
done
echo "building the default (carried as $so)"
build ""
ls -la .variants "$so"
cat <<EOF

Device call (one, with timeout_s=600):
  command: TUBEVIT_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc setup.py || echo -dirty) STEPS="build tests memcheck racecheck bench variants initcheck bench-compile" bash bench/gpu_check.sh
  carry:   ["$so", ".variants"]
To run the suite and the sanitizers on a variant instead of the default, start the command with
  cp .variants/NAME.so $so &&
EOF
