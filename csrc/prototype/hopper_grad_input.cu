// Input gradient on Hopper tensor cores, step 1: dP_i = G_i W_i (fp32) for
// every tube in one persistent, warp-specialized launch (tile logic:
// hopper_tiles.h, DpParams). Per tile (tube, 128 token rows, 128
// patch columns) warpgroup 0 copies, per step of 64 channels, the tile's G
// rows (16-byte cp.async, K-major) and the W_i rows of those channels (the
// widest cp.async K_i and W_i's alignment allow, MN-major) into 128-byte-
// swizzled shared memory; warpgroups 1 and 2 run wgmma (A K-major, B
// MN-major) and store their fp32 accumulators into the dP workspace, while
// the producer fills the next tile's stages. Step 2, the writer of
// kernels/grad_input.h (dx::from_dp, DxPass::Writer), turns dP into dx.
//
// Built only for sm_90a; other architectures compile an empty body and
// hopper::grad_input_supported() keeps the host from launching it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "hopper_tiles.h"
#include "hopper.h"
#include "hopper_device.cuh"

namespace tubevit {
namespace hopper {
namespace {

// G rows (channels contiguous: K-major) and W_i as (column, channel)
// (columns contiguous: MN-major); nothing else in shared memory.
template <typename T>
using DpTraits = StageTraits<T, layouts::DpA<T>, layouts::DpB<T>>;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) dp_kernel(const __grid_constant__ DpParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Tr = DpTraits<T>;
  using Pipeline = typename Tr::Pipeline;
  extern __shared__ char smem_raw[];
  auto& s = aligned_shared<typename Tr::Shared>(smem_raw);
  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  Pipeline pipe = start_pipeline<Tr>(s, warpgroup);

  Tensor sA = make_tensor(make_smem_ptr(s.a), typename Tr::SmemA{});  // (token, channel, stage)
  Tensor sB = make_tensor(make_smem_ptr(s.b), typename Tr::SmemB{});  // (patch column, channel, stage)
  const int64_t steps = (p.d + BK - 1) / BK;

  if (warpgroup == 0) {
    const int t = threadIdx.x;
    const T* __restrict__ g = static_cast<const T*>(p.g);
    auto state = cutlass::make_producer_start_state<Pipeline>();
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, blockIdx.x, gridDim.x, j);
      if (tile < 0) break;
      const DpTile tc = locate_dp_tile(p, tile);
      const DpTube& tube = p.t[tc.tube];
      const T* __restrict__ w = static_cast<const T*>(tube.w);
      const int64_t grow = dp_grad_row(p, tube, tc.m0 + t);
      with_width(tube.vb, [&](auto vb) {
        constexpr int VB = decltype(vb)::value;
        for (int64_t k = 0; k < steps; ++k) {
          pipe.producer_acquire(state);
          const int stage = state.index();
          dp_a_step(p, t, grow, k * BK, [&](int m, int c, int64_t src) { copy_chunk<8>(&sA(m, c, stage), g, src); });
          dp_b_step<VB>(p, tube, tc, t, k * BK,
                        [&](int n, int c, int64_t src, int) { copy_chunk<VB>(&sB(n, c, stage), w, src); });
          if constexpr (VB == 1) cutlass::arch::fence_view_async_shared();
          pipe.producer_commit(state, cutlass::arch::cpasync_barrier_arrive);
          ++state;
        }
      });
    }
    pipe.producer_tail(state);
  } else {
    const int ct = threadIdx.x - kProducerThreads;
    auto mma = make_tiled_mma(GmmaAtom<T, GMMA::Major::K, GMMA::Major::MN>{}, Layout<Shape<_2, _1, _1>>{});
    auto thr = mma.get_slice(ct);
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    Tensor tCcC = thr.partition_C(make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{})));
    Tensor acc = thr.make_fragment_C(tCcC);
    typename Pipeline::PipelineState read, release;
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, blockIdx.x, gridDim.x, j);
      if (tile < 0) break;
      const DpTile tc = locate_dp_tile(p, tile);
      const DpTube& tube = p.t[tc.tube];
      clear(acc);
      mma_stages(pipe, read, release, steps, mma, tCrA, tCrB, acc, [](int) {});
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) {
        const int64_t e = dp_entry(tube, tc, get<0>(tCcC(i)), get<1>(tCcC(i)));
        if (e >= 0) p.dp[e] = acc(i);
      }
    }
  }
#else
  __trap();  // never launched: grad_input_supported() is false without sm_90a code
#endif
}

}  // namespace

bool grad_input_supported(const at::Tensor& x, const TubeLayout& L) {
  return kernel_takes(x, L, DpTraits<cutlass::half_t>::kSmemBytes);
}

at::Tensor grad_dp(const at::Tensor& grad_out, const std::vector<at::Tensor>& weights, const TubeLayout& L) {
  const at::Tensor grad = aligned_rows(grad_out);  // 16-byte G chunks
  DpParams p = make_dp_params(L);
  at::Tensor dp = at::empty({p.dp_elems}, grad.options().dtype(at::kFloat));
  bind_dp(p, grad, weights, dp.mutable_data_ptr<float>());
  if (p.n_tiles == 0) return dp;
  const int device = grad.device().index();
  const int64_t grid = std::min<int64_t>(p.n_tiles, at::cuda::getDeviceProperties(device)->multiProcessorCount);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16bit(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    allow_smem<DpTraits<T>>(reinterpret_cast<const void*>(dp_kernel<T>), DpTraits<T>::kSmemBytes, device);
    dp_kernel<T><<<grid, kThreads, DpTraits<T>::kSmemBytes, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dp;
}

}  // namespace hopper
}  // namespace tubevit
