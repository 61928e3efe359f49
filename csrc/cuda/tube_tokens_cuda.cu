// CUDA backend of tubevit::tube_tokens and tubevit::tube_tokens_backward
// (and of tubevit::tube_tokens_naive*): the correctness-first kernels of
// naive_kernels.h run as grid-stride kernels, one thread per output element.
// The tensor-core implicit-GEMM kernels (issue 3) will take over the main
// ops; these stay as the naive GPU path they are tested against.
//
// Every launch: on the current stream, under a device guard, checked, and
// skipped when empty (a zero-sized grid is an invalid launch).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../naive_kernels.h"

namespace tubevit {
namespace {

constexpr int kThreads = 256;

template <class F>
__global__ void __launch_bounds__(kThreads) grid_stride_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    f(i);
  }
}

struct CudaLauncher {
  template <class F>
  static void run(int64_t n, const F& f) {
    if (n <= 0) return;
    // Grid-stride loops cover the rest; the cap keeps the grid well in range.
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
    grid_stride_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor tube_tokens_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return naive::forward<CudaLauncher>(x, weights, biases, tubes, pos_embed);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> tube_tokens_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return naive::backward<CudaLauncher>(grad_out, x, weights, tubes, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit, CUDA, m) {
  m.impl("tube_tokens", &tube_tokens_cuda);
  m.impl("tube_tokens_backward", &tube_tokens_backward_cuda);
  m.impl("tube_tokens_naive", &tube_tokens_cuda);
  m.impl("tube_tokens_naive_backward", &tube_tokens_backward_cuda);
}

}  // namespace tubevit
