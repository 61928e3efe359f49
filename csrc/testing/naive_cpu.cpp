// CPU launcher for the per-element kernels of kernels/naive_kernels.h,
// registered as tubevit_testing::tube_tokens_naive{,_backward}. These run the exact functors the
// CUDA backend launches, so the GPU kernels' index arithmetic is tested on
// machines without a GPU (python_tests/test_naive_kernels.py). Slow by
// design; not used by the library itself.
#include <torch/library.h>

#include "../kernels/naive_kernels.h"
#include "cpu_launcher.h"

namespace tubevit {
namespace {

at::Tensor tube_tokens_naive_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  return naive::forward<CpuLauncher>(x, weights, biases, tubes, pos_embed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> tube_tokens_naive_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes,
    std::array<bool, 3> output_mask) {
  return naive::backward<CpuLauncher>(grad_out, x, weights, tubes, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_naive", &tube_tokens_naive_cpu);
  m.impl("tube_tokens_naive_backward", &tube_tokens_naive_backward_cpu);
}

}  // namespace tubevit
