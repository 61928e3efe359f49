// tubevit_testing::dx_from_dp on CUDA: the dP -> dx kernels themselves
// (cuda/grad_input_cuda.cu) on a given dP, whatever the switches say, so the
// CUDA tests compare the gather, the scatter and the writer with each other
// and with their CPU emulation (dx_pass.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/grad_input_cuda.h"
#include "../tube_tokens.h"

namespace tubevit {
namespace {

at::Tensor dx_from_dp_cuda(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                           at::IntArrayRef tubes, const at::Tensor& dp, int64_t pass) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  TORCH_CHECK_VALUE(pass >= 0 && pass <= 2, "dx_pass must be 0 (gather), 1 (scatter) or 2 (writer), got ", pass);
  TORCH_CHECK(dp.device() == x.device(), "dp must be on x's device (", x.device(), "), got ", dp.device());
  const DxPass which = static_cast<DxPass>(pass);  // numbered alike (options.h)
  return dx::from_dp(x, dp, L, which);
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CUDA, m) { m.impl("dx_from_dp", &dx_from_dp_cuda); }

}  // namespace tubevit
