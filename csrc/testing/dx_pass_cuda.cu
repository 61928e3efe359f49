// tubevit_testing::dx_from_dp on CUDA: the dP -> dx gather kernel itself
// (cuda/grad_input_cuda.cu) on a given dP, so the CUDA tests compare it with
// its CPU emulation (dx_pass.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/grad_input_cuda.h"
#include "../tube_tokens.h"

namespace tubevit {
namespace {

at::Tensor dx_from_dp_cuda(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                           at::IntArrayRef tubes, const at::Tensor& dp) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  TORCH_CHECK(dp.device() == x.device(), "dp must be on x's device (", x.device(), "), got ", dp.device());
  return dx::from_dp(x, dp, L);
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CUDA, m) { m.impl("dx_from_dp", &dx_from_dp_cuda); }

}  // namespace tubevit
