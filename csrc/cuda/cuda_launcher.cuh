// The CUDA launcher for the per-element functors (kernels/naive_kernels.h,
// kernels/gemm_path.h, kernels/grad_input.h): f(i) for every i in [0, n) as
// a grid-stride kernel on the current stream, checked after the launch. The
// CPU twin is testing/cpu_launcher.h. Also the dynamic shared-memory opt-in
// of the kernels that need more than 48 KiB (allow_smem).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

namespace tubevit {

// Raises `kernel`'s dynamic shared-memory limit to `bytes`, once per device
// (the attribute is the device context's; setting it on every call would
// put a driver call on each launch's host path); Tag: a type unique to the
// kernel instantiation.
template <class Tag>
void allow_smem(const void* kernel, size_t bytes, int device) {
  static std::once_flag flags[64];
  std::call_once(flags[device % 64], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  });
}

constexpr int kLaunchThreads = 256;

template <class F>
__global__ void __launch_bounds__(kLaunchThreads) grid_stride_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    f(i);
  }
}

struct CudaLauncher {
  template <class F>
  static void run(int64_t n, const F& f) {
    if (n <= 0) return;  // a zero-sized grid is an invalid launch
    // Grid-stride loops cover the rest; the cap keeps the grid well in range.
    const int64_t blocks = std::min<int64_t>((n + kLaunchThreads - 1) / kLaunchThreads, int64_t(1) << 20);
    grid_stride_kernel<<<blocks, kLaunchThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace tubevit
