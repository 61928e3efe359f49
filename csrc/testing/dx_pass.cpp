// tubevit_testing::dx_from_dp on the CPU: dx from a given dP workspace by the
// gather or the writer as their kernels run (testing/dx_emulation.h), or by
// the per-tube scatter's functor on the CPU launcher. The CUDA version
// (dx_pass_cuda.cu) runs the kernels themselves, so a GPU test can compare
// the two bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../kernels/grad_input.h"
#include "cpu_launcher.h"
#include "dx_emulation.h"

namespace tubevit {
namespace {

at::Tensor dx_from_dp_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                          at::IntArrayRef tubes, const at::Tensor& dp, int64_t pass) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  int64_t dp_elems = 0;
  const ParamsDX p = make_dp_layout(L, nullptr, &dp_elems);
  TORCH_CHECK_VALUE(dp.scalar_type() == at::kFloat && dp.is_contiguous() && dp.numel() == dp_elems,
                    "dp must be a contiguous fp32 tensor of ", dp_elems, " elements, got ", dp.scalar_type(),
                    " with ", dp.numel());
  TORCH_CHECK_VALUE(pass >= 0 && pass <= 2, "dx_pass must be 0 (gather), 1 (scatter) or 2 (writer), got ", pass);
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, "x must be fp16, bf16 or fp32, got ",
                   t);
  if (pass == 1) {
    at::Tensor dx;
    const std::vector<int64_t> dp_off(p.dp_offset, p.dp_offset + p.n_tubes);
    if (dx::grad_input_scatter<CpuLauncher>(dp, dp_off, L, &dx, x.options())) return dx;
  }
  at::Tensor dx = at::full({L.batch, L.channels, L.size[0], L.size[1], L.size[2]},
                           std::numeric_limits<double>::quiet_NaN(), x.options());
  if (dx.numel() == 0) return dx;
  TUBEVIT_DISPATCH_HALF_BF16_FLOAT(t, "dx_from_dp", [&] {
    if (pass == 2)
      dx::emulate_writer<scalar_t>(p, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>(), 2);
    else
      dx::emulate_gather<scalar_t>(p, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) { m.impl("dx_from_dp", &dx_from_dp_cpu); }

}  // namespace tubevit
