// See cuda_plan.h. Host code only, in every build (the CPU-only one too), so
// the table is testable without CUDA.
#include "cuda_plan.h"

#include "kernels/common.h"

namespace tubevit {
namespace {

bool is16(c10::ScalarType t) { return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16; }

// The tensor-core kernels (cuda/tube_tokens_tc.cu): sm_80+, fp16 / bf16, or fp32 as TF32.
bool tc_applies(const PlanProblem& p) {
  const bool tf32 = p.dtype == c10::ScalarType::Float && p.tf32_conv;
  return (is16(p.dtype) || tf32) && p.n_tubes <= kMaxTubes && p.sm_major >= 8;
}

// The GEMM path. Its fp32 GEMMs run at PyTorch's matmul precision (exact
// fp32 by default, which cuBLAS runs faster than our TF32 kernels); with TF32
// matmuls on but TF32 convolutions off the call stays exact, as Conv3d would.
bool gemm_applies(const PlanProblem& p) {
  bool ok = false;
  if (p.dtype == c10::ScalarType::Half) ok = true;
  if (p.dtype == c10::ScalarType::BFloat16) ok = p.sm_major >= 8;
  if (p.dtype == c10::ScalarType::Float) ok = !p.tf32_matmul || p.tf32_conv;
  return ok && p.gemm_fits;
}

bool gemm_by_size(const PlanProblem& p, bool backward) {
  const int64_t elems = p.batch * p.num_tokens * p.dim;
  const bool fp32 = p.dtype == c10::ScalarType::Float;
  if (!backward) return fp32 || elems >= kGemmMinOutputFwd16;
  return elems >= (fp32 ? kGemmMinOutputBwd32 : kGemmMinOutputBwd16);
}

Kernels choose(const PlanProblem& p, CudaPath want, bool backward) {
  if (want == CudaPath::Naive) return Kernels::Naive;
  const bool tc = tc_applies(p);
  if (want == CudaPath::TensorCore) return tc ? Kernels::TensorCore : Kernels::Naive;
  const bool try_gemm = want == CudaPath::Gemm || !tc || gemm_by_size(p, backward);
  if (try_gemm && gemm_applies(p)) return Kernels::Gemm;
  if (tc) return Kernels::TensorCore;
  return Kernels::Naive;
}

}  // namespace

const char* kernels_name(Kernels k) {
  switch (k) {
    case Kernels::Naive: return "naive";
    case Kernels::Gemm: return "gemm";
    case Kernels::TensorCore: return "tc";
    case Kernels::Hopper: return "hopper";
  }
  return "?";
}

Plan plan_cuda(const PlanProblem& p, CudaPath want) {
  Plan plan;
  plan.forward = choose(p, want, /*backward=*/false);
  plan.grad_weight = plan.grad_input = choose(p, want, /*backward=*/true);
  if (want == CudaPath::Hopper) {
    if (p.hopper_forward) plan.forward = Kernels::Hopper;
    if (p.hopper_grad_weight) plan.grad_weight = Kernels::Hopper;
    if (p.hopper_grad_input) plan.grad_input = Kernels::Hopper;
  }
  return plan;
}

}  // namespace tubevit
