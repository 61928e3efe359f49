// The CUDA planner: which kernels one call of tubevit::tube_tokens /
// tube_tokens_backward runs, as a pure host function of the problem's sizes,
// dtype, the device's capability, PyTorch's TF32 switches and the
// TUBEVIT_CUDA_PATH override (csrc/options.h). cuda/tube_tokens_cuda.cu asks
// it once per call and does what the plan says; the decision table is
// tested on the CPU (python_tests/test_cuda_plan.py, through
// tubevit_ext._C._cuda_plan), so no GPU is needed to check a routing change.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "options.h"

namespace tubevit {

// The kernel families (bench/DESIGN.md, "CUDA paths"):
//   Naive       kernels/naive_kernels.h, one thread per output element, fp32
//               sums in fp64: fp64, and whatever the others do not take;
//   Gemm        kernels/gemm_path.h: our gather, cuBLAS GEMMs, our placement;
//               backward dP by cuBLAS, dx by the gather (cuda/grad_input_cuda.cu);
//   TensorCore  cuda/tube_tokens_tc.cu: WMMA implicit-GEMM kernels, one
//               launch per pass; backward dP on tensor cores, dx by the gather;
//   Hopper      the prototype's sm_90a kernels (csrc/prototype/): forward,
//               dW with db fused, dP by wgmma then the dx writer.
enum class Kernels { Naive, Gemm, TensorCore, Hopper };

const char* kernels_name(Kernels k);

// What the planner needs to know of a call. Sizes as in TubeLayout.
struct PlanProblem {
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t batch = 0, num_tokens = 0, dim = 0;
  int n_tubes = 0;
  int sm_major = 0;          // the device's compute capability major
  bool tf32_conv = false;    // torch.backends.cudnn.allow_tf32 (PyTorch's convolutions' TF32 switch)
  bool tf32_matmul = false;  // fp32 matmuls below fp32 precision (torch.backends.cuda.matmul.allow_tf32)
  bool gemm_fits = false;    // gemm::make_layout succeeds: <= kMaxTubes tubes, 32-bit element indices
  // The prototype's kernels take this call (its supported() functions; false without TUBEVIT_WITH_PROTOTYPE)
  bool hopper_forward = false, hopper_grad_weight = false, hopper_grad_input = false;
};

// One call's kernels: the forward, or the backward's weight gradient (db
// rides with it on the Hopper kernels; elsewhere db is its own reduction,
// cuda/bias_grad_cuda.cu) and input gradient.
struct Plan {
  Kernels forward = Kernels::Naive;
  Kernels grad_weight = Kernels::Naive;
  Kernels grad_input = Kernels::Naive;
};

// The decision (every branch is a row of test_cuda_plan.py's table):
//   naive   the naive kernels everywhere;
//   tc      the tensor-core kernels where they apply (sm_80+, fp16 / bf16,
//           fp32 while TF32 convolutions are allowed, <= kMaxTubes tubes),
//           else naive;
//   gemm    the GEMM path where it applies (fp16; bf16 on sm_80+; fp32 unless
//           TF32 matmuls are on while TF32 convolutions are off, which
//           Conv3d would run exact; the layout fits), else the tensor-core
//           kernels, else naive;
//   auto    where both fast paths apply, by the size of the (B, N, d) output
//           (kGemmMin* below), forward and backward separately; else the one
//           that applies (the GEMM path first); else naive;
//   hopper  each of the three parts by the prototype's kernels where they
//           take it, the rest as auto.
Plan plan_cuda(const PlanProblem& p, CudaPath want);

// Where both fast paths apply, auto takes the GEMM path from these output
// sizes on (elements of (B, N, d)). Measured on an H200 (paper tubes, T = 32,
// d = 768; bench/DESIGN.md, "CUDA path choice"): forward, 16-bit, the
// tensor-core kernel wins at B = 1 (0.13 vs 0.16 ms), the GEMM path from B = 4
// (B = 32: 0.26 vs 0.58 ms); fp32 forward always the GEMM path (exact fp32,
// as fast or faster than the TF32 kernel at every B). Backward, 16-bit: the
// tensor-core kernels win up to B = 16 (0.47 vs 0.87 ms) and tie at B = 32;
// fp32: they win up to B = 16, the GEMM path at B = 32 (0.98 vs 1.13 ms).
constexpr int64_t kGemmMinOutputFwd16 = int64_t(1) << 20;   // B >= 3 for the paper tubes at d = 768
constexpr int64_t kGemmMinOutputBwd16 = int64_t(12) << 20;  // B >= 31
constexpr int64_t kGemmMinOutputBwd32 = int64_t(8) << 20;   // B >= 21

}  // namespace tubevit
