// Forward of all tubes on Hopper tensor cores: one persistent,
// warp-specialized launch over the tile list of hopper_tiles.h.
// Warpgroup 0 gathers, per K step, the A tile (patch rows of x, each thread
// walking its row's columns) and the B tile (W_i rows) into 128-byte-
// swizzled K-major shared memory with cp.async (zero-filled at the edges);
// warpgroups 1 and 2 run wgmma (CuTe's SM90 GMMA atoms, 64 x 128 x 16 each,
// fp32 accumulation) on the stage; kStages stages in flight, handed over by
// mbarriers (CUTLASS's PipelineAsync, the protocol of its cp.async GMMA
// mainloop: the producer's cp.async arrive + arrive, the consumers' release
// one wgmma batch behind). The epilogue adds bias and position embedding in
// fp32, casts, stages the tile in shared memory and writes 16-byte chunks
// into the tube's rows of the (B, N, d) buffer, while the producer already
// gathers the CTA's next tile.
//
// Built only for sm_90a (wgmma needs the arch-specific target); other
// architectures compile an empty body and hopper::supported() keeps the
// host from launching it.
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

// Shared memory of one CTA besides the operand stages (hopper_device.cuh:
// StageTraits; dynamic, aligned_shared rounds its start up to 1024 bytes).
template <typename T>
struct ForwardExtra {
  alignas(16) T staged[BM * kStagePitch];  // the tile's output, cast, before the 16-byte stores
  RowInfo rows[BM];                        // the tile's output / position-embedding rows
};
template <typename T>
using Traits = StageTraits<T, layouts::ForwardA<T>, layouts::ForwardB<T>, ForwardExtra<T>>;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Tr = Traits<T>;
  using Pipeline = typename Tr::Pipeline;
  extern __shared__ char smem_raw[];
  auto& s = aligned_shared<typename Tr::Shared>(smem_raw);
  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  Pipeline pipe = start_pipeline<Tr>(s, warpgroup);

  Tensor sA = make_tensor(make_smem_ptr(s.a), typename Tr::SmemA{});  // (BM, BK, stage)
  Tensor sB = make_tensor(make_smem_ptr(s.b), typename Tr::SmemB{});  // (BN, BK, stage)

  if (warpgroup == 0) {
    // ---- producer: row t of A and of B for every K step of every tile of this CTA
    const int t = threadIdx.x;
    const T* __restrict__ x = static_cast<const T*>(p.x);
    auto state = cutlass::make_producer_start_state<Pipeline>();
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, blockIdx.x, gridDim.x, j);
      if (tile < 0) break;
      const TileCoord tc = locate_tile(p, tile);
      const Tube& tube = p.t[tc.tube];
      const T* __restrict__ w = static_cast<const T*>(tube.w);
      const int64_t K = tube.g.patch_size, row_org = row_origin(p, tube, tc.m0 + t);
      ColumnWalker walk;
      walk.start(p, tube, 0);
      with_width(tube.va, [&](auto va) {
        with_width(tube.vb, [&](auto vb) {
          constexpr int VA = decltype(va)::value, VB = decltype(vb)::value;
          for (int64_t k0 = 0; k0 < K; k0 += BK) {
            pipe.producer_acquire(state);
            const int stage = state.index();
            a_step<VA>(p, tube, t, row_org, walk,
                       [&](int m, int kk, int64_t src, int) { copy_chunk<VA>(&sA(m, kk, stage), x, src); });
            b_step<VB>(p, tube, t, tc.n0, k0,
                       [&](int n, int kk, int64_t src, int) { copy_chunk<VB>(&sB(n, kk, stage), w, src); });
            // plain shared stores (V = 1) -> visible to wgmma (async proxy) before the arrive
            if constexpr (VA == 1 || VB == 1) cutlass::arch::fence_view_async_shared();
            pipe.producer_commit(state, cutlass::arch::cpasync_barrier_arrive);
            ++state;
          }
        });
      });
    }
    pipe.producer_tail(state);  // the consumers have released every stage before the CTA exits
  } else {
    // ---- consumers: wgmma over the stages, then the epilogue
    const int ct = threadIdx.x - kProducerThreads;
    auto mma = make_tiled_mma(GmmaAtom<T, GMMA::Major::K>{}, Layout<Shape<_2, _1, _1>>{});  // 2 warpgroups along M
    auto thr = mma.get_slice(ct);
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // smem descriptors (MMA, MMA_M, MMA_K, stage)
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    Tensor tCcC = thr.partition_C(make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{})));  // (m, n) per value
    Tensor acc = thr.make_fragment_C(tCcC);
    typename Pipeline::PipelineState read, release;
    T* __restrict__ out = static_cast<T*>(p.out);
    const T* __restrict__ pe = static_cast<const T*>(p.pe);
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, blockIdx.x, gridDim.x, j);
      if (tile < 0) break;
      const TileCoord tc = locate_tile(p, tile);
      const Tube& tube = p.t[tc.tube];
      const int64_t steps = (tube.g.patch_size + BK - 1) / BK;
      clear(acc);
      mma_stages(pipe, read, release, steps, mma, tCrA, tCrB, acc, [](int) {});

      // epilogue: row table, fp32 bias + position embedding, cast into the staging tile
      if (ct < BM) s.extra.rows[ct] = row_info(p, tube, tc.m0 + ct);
      named_sync<1, kConsumerThreads>();
      const T* __restrict__ bias = static_cast<const T*>(tube.bias);
      const int64_t d = p.d;
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) {
        const int m = get<0>(tCcC(i)), n = get<1>(tCcC(i));
        const int64_t c = tc.n0 + n;
        float v = acc(i);
        if (c < d) {
          if (bias != nullptr) v += static_cast<float>(bias[c]);
          const int64_t pr = s.extra.rows[m].pe_row;
          if (pe != nullptr && pr >= 0) v += static_cast<float>(pe[pr * d + c]);
        }
        s.extra.staged[m * kStagePitch + n] = T(v);
      }
      named_sync<1, kConsumerThreads>();
      // 16-byte chunks of whole rows (d % 8 == 0: a chunk is all in or all out)
      CUTE_UNROLL
      for (int q = ct; q < BM * BN / kOutChunk; q += kConsumerThreads) {
        const Chunk ch = store_chunk(q);
        const int64_t orow = s.extra.rows[ch.row].out_row, c = tc.n0 + ch.col;
        if (orow >= 0 && c < d)
          *reinterpret_cast<uint4*>(out + orow * d + c) =
              *reinterpret_cast<const uint4*>(&s.extra.staged[ch.row * kStagePitch + ch.col]);
      }
      named_sync<1, kConsumerThreads>();  // staging tile and row table free for the next tile
    }
  }
#else
  __trap();  // never launched: hopper::supported() is false without sm_90a code
#endif
}

}  // namespace

bool supported(const at::Tensor& x, const TubeLayout& L) {
  return kernel_takes(x, L, Traits<cutlass::half_t>::kSmemBytes);
}

void forward(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  const Params p = make_params(L, x, weights, biases, pe, out);
  if (p.n_tiles == 0) return;
  const int device = x.device().index();
  const int64_t grid = std::min<int64_t>(p.n_tiles, at::cuda::getDeviceProperties(device)->multiProcessorCount);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_16bit(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    allow_smem<Traits<T>>(reinterpret_cast<const void*>(forward_kernel<T>), Traits<T>::kSmemBytes, device);
    forward_kernel<T><<<grid, kThreads, Traits<T>::kSmemBytes, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hopper
}  // namespace tubevit
