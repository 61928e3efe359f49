// Weight and bias gradients of all tubes on Hopper tensor cores, the
// forward's skeleton (hopper_forward.cu) turned around: per tile
// (tube, token split, patch-column tile, channel tile; hopper_tiles.h)
// warpgroup 0 gathers per K step 64 token rows of G (16-byte cp.async of the
// tile's 128 channels) and of the patch matrix (cp.async chunks of kw runs
// through a per-tile column table), both into 128-byte-swizzled MN-major
// shared memory; warpgroups 1 and 2 run wgmma (A = G^T, B = P, both MN-major)
// with fp32 accumulators and write the tile's fp32 partial for its split;
// the CTAs of column tile 0 also sum their G rows (db). A second launch sums
// the splits in order and casts (deterministic).
//
// Built only for sm_90a; other architectures compile an empty body and
// hopper::grad_weight_supported() keeps the host from launching it.
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

// G^T (channels contiguous) and P (patch columns contiguous): both MN-major;
// besides the stages, the tile's patch-column offsets (producer only).
struct DwExtra {
  int64_t col_off[BN];
};
template <typename T>
using DwTraits = StageTraits<T, layouts::DwA<T>, layouts::DwB<T>, DwExtra>;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) dw_kernel(const __grid_constant__ DwParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Tr = DwTraits<T>;
  using Pipeline = typename Tr::Pipeline;
  extern __shared__ char smem_raw[];
  auto& s = aligned_shared<typename Tr::Shared>(smem_raw);
  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  Pipeline pipe = start_pipeline<Tr>(s, warpgroup);

  Tensor sA = make_tensor(make_smem_ptr(s.a), typename Tr::SmemA{});  // (channel, token, stage)
  Tensor sB = make_tensor(make_smem_ptr(s.b), typename Tr::SmemB{});  // (patch column, token, stage)

  if (warpgroup == 0) {
    const int t = threadIdx.x;
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const T* __restrict__ g = static_cast<const T*>(p.g);
    auto state = cutlass::make_producer_start_state<Pipeline>();
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, blockIdx.x, gridDim.x, j);
      if (tile < 0) break;
      const DwTile tc = locate_dw_tile(p, tile);
      const DwTube& tube = p.t[tc.tube];
      named_sync<2, kProducerThreads>();  // every producer is done with the previous tile's table
      s.extra.col_off[t] = dw_column(p, tube, tc.c0, t);
      named_sync<2, kProducerThreads>();
      with_width(tube.vb, [&](auto vb) {
        constexpr int VB = decltype(vb)::value;
        for (int64_t k0 = tc.r0; k0 < tc.r1; k0 += BK) {
          pipe.producer_acquire(state);
          const int stage = state.index();
          dw_a_step(p, tube, tc, t, k0, [&](int m, int tok, int64_t src) { copy_chunk<8>(&sA(m, tok, stage), g, src); });
          dw_b_step<VB>(p, tube, tc, t, k0, s.extra.col_off,
                        [&](int n, int tok, int64_t src, int) { copy_chunk<VB>(&sB(n, tok, stage), x, src); });
          if constexpr (VB == 1) cutlass::arch::fence_view_async_shared();
          pipe.producer_commit(state, cutlass::arch::cpasync_barrier_arrive);
          ++state;
        }
      });
    }
    pipe.producer_tail(state);
  } else {
    const int ct = threadIdx.x - kProducerThreads;
    auto mma = make_tiled_mma(GmmaAtom<T, GMMA::Major::MN>{}, Layout<Shape<_2, _1, _1>>{});
    auto thr = mma.get_slice(ct);
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    Tensor tCcC = thr.partition_C(make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{})));
    Tensor acc = thr.make_fragment_C(tCcC);
    typename Pipeline::PipelineState read, release;
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, blockIdx.x, gridDim.x, j);
      if (tile < 0) break;
      const DwTile tc = locate_dw_tile(p, tile);
      const DwTube& tube = p.t[tc.tube];
      const bool do_db = dw_tile_sums_db(p, tc) && ct < BM;  // consumer thread ct sums channel ct
      float db_acc = 0.f;
      clear(acc);
      mma_stages(pipe, read, release, (tc.r1 - tc.r0 + BK - 1) / BK, mma, tCrA, tCrB, acc, [&](int stage) {
        if (do_db) {  // channel ct's G entries of this step (zeros where out of range)
          CUTE_UNROLL
          for (int tok = 0; tok < BK; ++tok) db_acc += static_cast<float>(sA(ct, tok, stage));
        }
      });
      // this split's fp32 partial of the tile
      const int64_t d = p.d, K = tube.g.patch_size;
      float* __restrict__ part = p.ws + tube.ws_offset + tc.split * d * K;
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) {
        const int64_t row = tc.n0 + get<0>(tCcC(i)), col = tc.c0 + get<1>(tCcC(i));
        if (row < d && col < K) part[row * K + col] = acc(i);
      }
      if (do_db && tc.n0 + ct < d) p.ws_db[tube.db_offset + tc.split * d + tc.n0 + ct] = db_acc;
    }
  }
#else
  __trap();  // never launched: grad_weight_supported() is false without sm_90a code
#endif
}

// The splits of every dW / db entry summed in split order, cast.
template <typename T>
__global__ void dw_reduce_kernel(const __grid_constant__ DwParams p, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const DwEntry en = dw_entry(p, e);
    const float v = dw_sum(p, en);
    const DwTube& t = p.t[en.tube];
    static_cast<T*>(en.bias ? t.db : t.dw)[en.index] = T(v);
  }
}

}  // namespace

bool grad_weight_supported(const at::Tensor& x, const TubeLayout& L) {
  return kernel_takes(x, L, DwTraits<cutlass::half_t>::kSmemBytes);
}

void grad_weight(const at::Tensor& x, const at::Tensor& grad_out, const TubeLayout& L, std::vector<at::Tensor>& dws,
                 std::vector<at::Tensor>* dbs) {
  const at::Tensor grad = aligned_rows(grad_out);  // 16-byte G chunks
  if (dbs != nullptr) {
    dbs->clear();
    for (int64_t i = 0; i < int64_t(L.tubes.size()); ++i) dbs->push_back(at::empty({L.dim}, x.options()));
  }
  const int device = x.device().index();
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  DwParams p = make_dw_params(L, 4 * int64_t(sms));
  const at::Tensor ws = at::empty({p.ws_elems}, x.options().dtype(at::kFloat));
  const at::Tensor ws_db = at::empty({dbs != nullptr ? p.db_elems : 0}, x.options().dtype(at::kFloat));
  bind_dw(p, x, grad, dws, dbs != nullptr ? *dbs : std::vector<at::Tensor>{}, ws.mutable_data_ptr<float>(),
          ws_db.mutable_data_ptr<float>());
  const int64_t total = dw_reduce_total(p);
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = std::min<int64_t>(p.n_tiles, sms);
  const int64_t rgrid = std::min<int64_t>((total + 255) / 256, int64_t(sms) * 8);
  dispatch_16bit(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (grid > 0) {
      allow_smem<DwTraits<T>>(reinterpret_cast<const void*>(dw_kernel<T>), DwTraits<T>::kSmemBytes, device);
      dw_kernel<T><<<grid, kThreads, DwTraits<T>::kSmemBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dw_reduce_kernel<T><<<rgrid, 256, 0, stream>>>(p, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace hopper
}  // namespace tubevit
