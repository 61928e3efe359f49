// tubevit_testing::dx_from_dp on the CPU: dx from a given dP workspace by the
// gather as its kernel runs (testing/dx_emulation.h). The CUDA version
// (dx_pass_cuda.cu) runs the kernel itself, so a GPU test can compare the
// two bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>


#include "../kernels/grad_input.h"
#include "dx_emulation.h"

namespace tubevit {
namespace {

at::Tensor dx_from_dp_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                          at::IntArrayRef tubes, const at::Tensor& dp) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  ParamsDX p;
  at::Tensor dx = dx::dx_test_output(L, x, dp, &p);
  const auto t = x.scalar_type();
  if (dx.numel() == 0) return dx;
  TUBEVIT_DISPATCH_HALF_BF16_FLOAT(t, "dx_from_dp", [&] {
    dx::emulate_gather<scalar_t>(p, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) { m.impl("dx_from_dp", &dx_from_dp_cpu); }

}  // namespace tubevit
