// The input gradient on CUDA from the dP workspace (both fast paths compute
// dP: cuBLAS on the GEMM path, the tensor-core dP kernel otherwise). The
// gather kernel below is the default: one block per (b, c, t, GH x GW) tile
// of dx, grid-stride over tiles, every voxel summing the dP entries of the
// tokens that cover it (tile logic in kernels/grad_input.h). The per-tube
// scatter and the writer (the gather's sums, 8 voxels and one 16-byte store
// per thread) are opt-in (TUBEVIT_DX_PASS=scatter | writer, csrc/options.h);
// the Hopper path's input gradient (TUBEVIT_CUDA_PATH=hopper) takes the writer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "../kernels/grad_input.h"
#include "../options.h"
#include "cuda_launcher.cuh"
#include "grad_input_cuda.h"

namespace tubevit {
namespace dx {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads)
    tube_dx_gather_kernel(const float* __restrict__ dp, scalar_t* __restrict__ dx, const ParamsDX p, int64_t C,
                          int64_t T, int64_t H, int64_t W, int64_t tiles) {
  __shared__ DxGatherTables tb;
  const int64_t size[3] = {T, H, W};
  for (int64_t blk = blockIdx.x; blk < tiles; blk += gridDim.x) {
    const DxTile tl = dx_gather_tile(C, size, blk);
    __syncthreads();  // previous tile's tables consumed
    dx_gather_fill_tables(p, tl, threadIdx.x, tb);
    __syncthreads();
    dx_gather_voxels<scalar_t>(p, dp, C, size, tl, threadIdx.x, tb, dx);
  }
}

// The writer (kernels/grad_input.h): blockIdx.x the column tile, blockIdx.y
// striding over row tiles; dynamic shared memory: the range table. Three
// blocks per SM: ptxas then keeps it in 72-76 registers without spills
// (bench/check_sass.py holds it to 85 and no local memory).
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

at::Tensor write(const at::Tensor& x, const at::Tensor& dp, const ParamsDX& p, const TubeLayout& L) {
  at::Tensor dx = at::empty({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, x.options());
  if (dx.numel() == 0) return dx;
  const DxWriter s = make_dx_writer(L);
  TORCH_CHECK(s.col_tiles <= 0x7fffffff, "dx::write: ", s.col_tiles, " column tiles do not fit a grid");
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

at::Tensor gather(const at::Tensor& x, const at::Tensor& dp, const ParamsDX& p, const TubeLayout& L) {
  at::Tensor dx = at::empty({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, x.options());
  if (dx.numel() == 0) return dx;
  const int64_t gather_tiles = dx_gather_tiles(L.batch, L.channels, L.size);
  const int64_t blocks = std::min<int64_t>(gather_tiles, int64_t(1) << 20);
  auto stream = at::cuda::getCurrentCUDAStream();
  TUBEVIT_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "tube_dx_gather", [&] {
    tube_dx_gather_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
        dp.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(), p, L.channels, L.size[0], L.size[1],
        L.size[2], gather_tiles);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

DxPass default_pass() { return options().dx_pass; }

at::Tensor from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L, DxPass pass) {
  int64_t dp_elems = 0;
  const ParamsDX p = make_dp_layout(L, nullptr, &dp_elems);  // the dX step reads dP and the geometry only
  TORCH_CHECK(dp.scalar_type() == at::kFloat && dp.is_contiguous() && dp.numel() == dp_elems,
              "dx::from_dp: dp must be a contiguous fp32 tensor of ", dp_elems, " elements, got ",
              dp.scalar_type(), " with ", dp.numel());
  if (pass == DxPass::Writer) return write(x, dp, p, L);
  if (pass == DxPass::Scatter) {
    at::Tensor dx;
    const std::vector<int64_t> dp_off(p.dp_offset, p.dp_offset + p.n_tubes);
    if (grad_input_scatter<CudaLauncher>(dp, dp_off, L, &dx, x.options())) return dx;
  }
  return gather(x, dp, p, L);
}

}  // namespace dx
}  // namespace tubevit
