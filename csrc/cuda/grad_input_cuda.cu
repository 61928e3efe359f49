// The input gradient on CUDA from the dP workspace (both fast paths compute
// dP: cuBLAS on the GEMM path, the tensor-core dP kernel otherwise): the
// gather, one block per (b, c, t, GH x GW) tile of dx, grid-stride over
// tiles, every voxel summing the dP entries of the tokens that cover it (tile
// logic in kernels/grad_input.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "../kernels/grad_input.h"
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

at::Tensor from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L) {
  int64_t dp_elems = 0;
  const ParamsDX p = make_dp_layout(L, nullptr, &dp_elems);  // the dX step reads dP and the geometry only
  TORCH_CHECK(dp.scalar_type() == at::kFloat && dp.is_contiguous() && dp.numel() == dp_elems,
              "dx::from_dp: dp must be a contiguous fp32 tensor of ", dp_elems, " elements, got ",
              dp.scalar_type(), " with ", dp.numel());
  return gather(x, dp, p, L);
}

}  // namespace dx
}  // namespace tubevit
