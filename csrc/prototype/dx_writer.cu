// The dx writer's kernel (prototype): dx from the dP workspace with the
// gather's sums in the gather's order, one 16-byte store per 8 voxels (tile
// logic in dx_writer.h). The Hopper input gradient's second step.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../cuda/cuda_launcher.cuh"
#include "dx_writer.h"
#include "hopper.h"

namespace tubevit {
namespace dx {
namespace {

// The writer (dx_writer.h): blockIdx.x the column tile, blockIdx.y
// striding over row tiles; dynamic shared memory: the range table. Three
// blocks per SM: ptxas then keeps it in 72-76 registers without spills
// (the prototype's check_sass step holds it to 85 and no local memory).
template <typename scalar_t>
__global__ void __launch_bounds__(kWriterThreads, 3)
    tube_dx_writer_kernel(const float* __restrict__ dp, scalar_t* __restrict__ dx, const ParamsDX p,
                          const DxWriter s, int64_t C, int64_t T, int64_t H, int64_t W) {
  extern __shared__ int32_t tb[];
  const int64_t size[3] = {T, H, W};
  const int64_t ct = blockIdx.x;
  dx_writer_fill_w(p, s, ct, threadIdx.x, tb);
  const auto store = [&](int64_t off, const float* v, int count) {
    if (count == kWriterVec && s.vector) {
      Vec<scalar_t, kWriterVec> r;
#pragma unroll
      for (int u = 0; u < kWriterVec; ++u) r.v[u] = static_cast<scalar_t>(v[u]);
      constexpr int kPart = 16 / int(sizeof(scalar_t));  // 16-byte stores
#pragma unroll
      for (int u = 0; u < kWriterVec; u += kPart)
        store_vec<scalar_t, kPart>(dx + off + u, *reinterpret_cast<const Vec<scalar_t, kPart>*>(&r.v[u]));
    } else {
#pragma unroll
      for (int u = 0; u < kWriterVec; ++u)  // constant trip count: v stays in registers
        if (u < count) dx[off + u] = static_cast<scalar_t>(v[u]);
    }
  };
  for (int64_t tile = blockIdx.y; tile < s.tiles; tile += gridDim.y) {
    const DxWriterTile tl = dx_writer_tile(s, C, T, tile);
    __syncthreads();  // the previous tile's t / h ranges consumed (and, first, the w ranges written)
    dx_writer_fill_th(p, s, tl, threadIdx.x, tb);
    __syncthreads();
    dx_writer_chunk(p, s, dp, C, size, ct, tl, threadIdx.x, tb, store);
  }
}

}  // namespace

at::Tensor write_from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L) {
  int64_t dp_elems = 0;
  const ParamsDX p = make_dp_layout(L, nullptr, &dp_elems);
  TORCH_CHECK(dp.scalar_type() == at::kFloat && dp.is_contiguous() && dp.numel() == dp_elems,
              "dx::write_from_dp: dp must be a contiguous fp32 tensor of ", dp_elems, " elements, got ",
              dp.scalar_type(), " with ", dp.numel());
  at::Tensor dx = at::empty({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, x.options());
  if (dx.numel() == 0) return dx;
  const DxWriter s = make_dx_writer(L);
  TORCH_CHECK(s.col_tiles <= 0x7fffffff, "dx::write_from_dp: ", s.col_tiles, " column tiles do not fit a grid");
  const int64_t grid_y = std::min<int64_t>(s.tiles, 65535);
  const dim3 grid(static_cast<unsigned>(s.col_tiles), static_cast<unsigned>(grid_y));
  const size_t smem = size_t(dx_writer_table_ints(s)) * sizeof(int32_t);
  auto stream = at::cuda::getCurrentCUDAStream();
  TUBEVIT_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "tube_dx_writer", [&] {
    tube_dx_writer_kernel<scalar_t><<<grid, kWriterThreads, smem, stream>>>(
        dp.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(), p, s, L.channels, L.size[0], L.size[1],
        L.size[2]);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace dx

#ifdef TUBEVIT_WITH_TESTING_OPS
namespace {
// tubevit_testing::dx_writer_from_dp on CUDA (schema: hopper_emulation.cpp): the writer kernel on a
// given dP, for the CUDA tests to compare with the gather and with its emulation.
at::Tensor dx_writer_from_dp_cuda(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                  at::IntArrayRef tubes, const at::Tensor& dp) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  TORCH_CHECK(dp.device() == x.device(), "dp must be on x's device (", x.device(), "), got ", dp.device());
  return dx::write_from_dp(x, dp, L);
}
}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CUDA, m) { m.impl("dx_writer_from_dp", &dx_writer_from_dp_cuda); }
#endif

}  // namespace tubevit
