// The host launcher for the per-element functors written for the GPU
// (kernels/naive_kernels.h, kernels/gemm_path.h, kernels/grad_input.h): f(i) for every i in [0, n), in parallel
// over ATen's intra-op threads. Lets the CPU test suite run the CUDA
// kernels' index arithmetic on machines without a GPU.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace tubevit {

struct CpuLauncher {
  template <class F>
  static void run(int64_t n, const F& f) {
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
};

}  // namespace tubevit
