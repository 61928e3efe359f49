// Forward of all tubes on Hopper tensor cores: one launch over the flat tile
// list of kernels/hopper_tiles.h, one warpgroup (128 threads) per 128 x 128
// tile, K in 64-wide steps. Per step the threads gather the A tile (patch
// rows of x, through the per-CTA row-origin and column-offset tables) and
// the B tile (W_i rows) into 128-byte-swizzled shared memory, then issue
// wgmma (CuTe's SM90 GMMA atoms, fp32 accumulation); the epilogue adds bias
// and position embedding in fp32, casts, and writes the tube's rows of the
// (B, N, d) buffer. Single-stage and synchronous: the correct skeleton the
// pipelined, warp-specialized version is measured against.
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

#include "../../kernels/hopper_tiles.h"
#include "../hopper_forward.h"

namespace tubevit {
namespace hopper {
namespace {

// torch's 16-bit types and CuTe's share the bit layout; the kernel uses CuTe's.
template <typename torch_t> struct CuteType;
template <> struct CuteType<at::Half> { using type = cutlass::half_t; };
template <> struct CuteType<at::BFloat16> { using type = cutlass::bfloat16_t; };

// One 64 x BN x 16 wgmma, both operands K-major in shared memory.
template <typename T> struct Gmma;
template <> struct Gmma<cutlass::half_t> {
  using type = cute::SM90_64x128x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};
template <> struct Gmma<cutlass::bfloat16_t> {
  using type = cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>;
};

constexpr int kThreads = 128;  // one warpgroup
static_assert(BM == kThreads && BN == kThreads && BK <= kThreads, "one row of A and of B per thread");

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using SmemA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<BM>{}, Int<BK>{})));
  using SmemB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, make_shape(Int<BN>{}, Int<BK>{})));
  // 128-byte swizzle atoms repeat every 1024 bytes: tiles start on that boundary
  __shared__ __align__(1024) T smem_a[cosize_v<SmemA>];
  __shared__ __align__(1024) T smem_b[cosize_v<SmemB>];
  __shared__ int64_t row_org[BM];
  __shared__ int64_t col_off[BK];

  const TileCoord tc = locate_tile(p, blockIdx.x);
  const Tube& tube = p.t[tc.tube];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(tube.w);
  const int64_t K = tube.g.patch_size, d = p.d;
  const int tid = threadIdx.x;

  Tensor sA = make_tensor(make_smem_ptr(smem_a), SmemA{});  // (BM, BK)
  Tensor sB = make_tensor(make_smem_ptr(smem_b), SmemB{});  // (BN, BK)
  auto mma = make_tiled_mma(typename Gmma<T>::type{});
  auto thr = mma.get_slice(tid);
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // smem descriptors
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
  Tensor tCcC = thr.partition_C(make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{})));  // (m, n) per value
  Tensor acc = thr.make_fragment_C(tCcC);
  clear(acc);

  row_org[tid] = row_origin(p, tube, tc.m0 + tid);
  const int64_t wrow = tc.n0 + tid;  // this thread's row of W (output channel)
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    if (tid < BK) col_off[tid] = column_offset(p, tube, k0 + tid);
    __syncthreads();  // tables written; the previous step's wgmma has completed (waited below)
    const int64_t ro = row_org[tid];
    CUTE_UNROLL
    for (int kk = 0; kk < BK; ++kk) {
      const int64_t co = col_off[kk];
      sA(tid, kk) = (ro >= 0 && co >= 0) ? x[ro + co] : T(0);
      sB(tid, kk) = (wrow < d && co >= 0) ? w[wrow * K + k0 + kk] : T(0);
    }
    cutlass::arch::fence_view_async_shared();  // generic-proxy stores -> visible to wgmma (async proxy)
    __syncthreads();
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA, tCrB, acc);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    __syncthreads();  // every thread's wgmma has read the tiles before they are overwritten
  }

  const T* bias = static_cast<const T*>(tube.bias);
  const T* pe = static_cast<const T*>(p.pe);
  T* out = static_cast<T*>(p.out);
  const int64_t n_tok = tube.g.num_tokens;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int64_t r = tc.m0 + get<0>(tCcC(i)), c = tc.n0 + get<1>(tCcC(i));
    const int64_t orow = output_row(p, tube, r);
    if (orow < 0 || c >= d) continue;
    float v = acc(i);
    if (bias != nullptr) v += static_cast<float>(bias[c]);
    if (pe != nullptr) v += static_cast<float>(pe[(tube.g.token_offset + r % n_tok) * d + c]);
    out[orow * d + c] = T(v);
  }
#else
  __trap();  // never launched: hopper::supported() is false without sm_90a code
#endif
}

}  // namespace

bool supported(const at::Tensor& x, const TubeLayout& L) {
#if defined(TUBEVIT_HOPPER_SM90A)
  const auto* prop = at::cuda::getDeviceProperties(x.device().index());
  const auto t = x.scalar_type();
  int64_t tiles = 0;
  for (const auto& g : L.tubes) tiles += (L.batch * g.num_tokens + BM - 1) / BM * ((L.dim + BN - 1) / BN);
  return prop->major == 9 && prop->minor == 0 && (t == at::kHalf || t == at::kBFloat16) &&
         L.tubes.size() <= size_t(kMaxTubes) && tiles < (int64_t(1) << 31);
#else
  (void)x;
  (void)L;
  return false;
#endif
}

void forward(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  const Params p = make_params(L, x, weights, biases, pe, out);
  if (p.n_tiles == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(x.scalar_type(), "tubevit_hopper_forward",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       forward_kernel<CuteType<scalar_t>::type><<<p.n_tiles, kThreads, 0, stream>>>(p);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       forward_kernel<CuteType<scalar_t>::type><<<p.n_tiles, kThreads, 0, stream>>>(p);
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hopper
}  // namespace tubevit
