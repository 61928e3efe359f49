// CUDA launcher for the test op tubevit_testing::tube_tokens_naive{,_backward}:
// the per-element kernels of kernels/naive_kernels.h as grid-stride kernels,
// always (whatever TUBEVIT_CUDA_PATH says), db included: they are what the
// CUDA suite checks the fast paths against.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/cuda_launcher.cuh"
#include "../kernels/naive_kernels.h"

namespace tubevit {
namespace {

at::Tensor naive_forward_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                              at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return naive::forward<CudaLauncher>(x, weights, biases, tubes, pos_embed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> naive_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return naive::backward<CudaLauncher>(grad_out, x, weights, tubes, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CUDA, m) {
  m.impl("tube_tokens_naive", &naive_forward_cuda);
  m.impl("tube_tokens_naive_backward", &naive_backward_cuda);
}

}  // namespace tubevit
