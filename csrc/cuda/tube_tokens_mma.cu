// The sm_80+ tensor-core forward and weight gradient for fp16 / bf16 on
// ldmatrix + mma.sync (TUBEVIT_TC_MMA=1, csrc/options.h). Forward: one
// launch for all tubes and samples, 128 x 128 tiles over (tube, 128 tokens
// flattened across samples) x (128 channels), 8 warps of 64 x 32, a 3-stage
// cp.async pipeline of 32-deep K steps, bias and position embedding added in
// fp32 from the accumulator registers. dW: the same warps and pipeline over
// (tube, token split, 128 patch columns, 128 channels) tiles reduced over
// 32-token steps, operands read by ldmatrix.trans, then (where tokens were
// split) one launch summing the fp32 partials in split order. Tile logic
// (which block, thread and lane touches which element) is
// kernels/mma_tiles.h, run on the CPU by the emulator
// (testing/mma_emulation.cpp) with ldmatrix and mma.sync written from the
// PTX ISA's fragment layouts; here only shared memory, barriers, the
// pipeline and the PTX. check_sass.py holds both kernels to LDSM, HMMA and
// LDGSTS present and no local memory on every arch built.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "../kernels/mma_tiles.h"
#include "cuda_launcher.cuh"
#include "tube_tokens_mma.h"

// Blocks per SM the register budget is sized for: two where two blocks'
// shared memory fits (sm_80: 164 KiB per SM, sm_90: 228 KiB), one on sm_86
// and sm_89 (100 KiB per SM hold one 61 KiB block; the cap of 128 registers
// cost ptxas 16 bytes of spills there).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890)
#define TUBEVIT_MMA_MIN_BLOCKS 1
#else
#define TUBEVIT_MMA_MIN_BLOCKS 2
#endif

namespace tubevit {
namespace mma {
namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8 x 8 matrices of 16-bit elements; lane l gives row l % 8 of matrix
// l / 8 (16 contiguous bytes), receives in r[j] the two elements at row
// l / 4, columns 2 (l % 4) + {0, 1} of matrix j.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The same four matrices transposed: lane l receives in r[j] the elements at
// stored row 2 (l % 4) + {0, 1}, column l / 4 of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A B + D, m16n8k16, A row-major (16 x 16), B column-major (16 x 8),
// fp32 accumulators.
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// This thread's copies of all but the newest N committed groups are done.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One staged K step (BK deep) of warp `warp`: per k16 slice, MT ldmatrix.x4
// for A, NT / 2 for B (one pair of n8 tiles at a time: 4 fragment registers
// live, not 8), MT x NT MMAs. The forward's fragments (a/b_frag_offset,
// plain ldmatrix) or dW's (dw_a/b_frag_offset, ldmatrix.trans).
template <bool kDw, typename scalar_t>
__device__ __forceinline__ void mma_step(float (&acc)[MT][NT][4], unsigned stage, int warp, int lane) {
  TUBEVIT_UNROLL
  for (int ks = 0; ks < BK / 16; ++ks) {
    unsigned a[MT][4];
    TUBEVIT_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (kDw) ldmatrix_x4_trans(a[mt], stage + 2u * dw_a_frag_offset(warp, lane, mt, ks));
      else ldmatrix_x4(a[mt], stage + 2u * a_frag_offset(warp, lane, mt, ks));
    }
    TUBEVIT_UNROLL
    for (int np = 0; np < NT / 2; ++np) {
      unsigned r[4];
      if constexpr (kDw) ldmatrix_x4_trans(r, stage + 2u * dw_b_frag_offset(warp, lane, np, ks));
      else ldmatrix_x4(r, stage + 2u * b_frag_offset(warp, lane, np, ks));
      const unsigned b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      TUBEVIT_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<scalar_t>(acc[mt][2 * np], a[mt], b0);
        mma_16816<scalar_t>(acc[mt][2 * np + 1], a[mt], b1);
      }
    }
  }
}

// The pipeline of both kernels (run_stages, kernels/mma_tiles.h) with
// issue(s, stage pointer) and the MMAs on shared-memory stages of kElems
// elements from dsmem.
template <bool kDw, int kElems, typename scalar_t, class Issue>
__device__ __forceinline__ void mainloop(float (&acc)[MT][NT][4], int steps, unsigned char* dsmem,
                                         const Issue& issue) {
  scalar_t* stages = reinterpret_cast<scalar_t*>(dsmem);
  const unsigned stages_addr = smem_addr(dsmem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  run_stages(
      steps, [&](int s, int stage) { issue(s, stages + stage * kElems); }, [] { cp_async_commit(); },
      [] {
        cp_async_wait<kStages - 2>();
        __syncthreads();
      },
      [&](int stage) {
        mma_step<kDw, scalar_t>(acc, stages_addr + 2u * static_cast<unsigned>(stage * kElems), warp, lane);
      });
}

__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
  TUBEVIT_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    TUBEVIT_UNROLL
    for (int nt = 0; nt < NT; ++nt)
      TUBEVIT_UNROLL
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
}
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <int VA, typename scalar_t>
__device__ __forceinline__ void tile(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pe,
                                     scalar_t* __restrict__ out, const Params& p, const Loc& l,
                                     const RowTables& t, unsigned char* dsmem) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  ACursor a = a_cursor(p, l, tid);
  float acc[MT][NT][4];
  zero(acc);
  mainloop<false, kStageElems, scalar_t>(acc, (static_cast<int>(p.g[l.i].patch_size) + BK - 1) / BK, dsmem,
                                         [&](int s, scalar_t* stage) {
                                           issue_step<VA>(p, l, x, t.x_row, a, s, tid, stage);
                                         });
  for_each_acc_pair(warp, lane, [&](int r, int n, int mt, int nt, int half) {
    store_pair(p, l, t, r, n, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1], pe, out);
  });
}
#endif

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, TUBEVIT_MMA_MIN_BLOCKS)
    tube_tokens_mma_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pe,
                           scalar_t* __restrict__ out, const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char dsmem[];
  __shared__ int x_row[BM], out_row[BM], pe_row[BM];
  const Loc l = locate(p, blockIdx.x);
  const RowTables t{x_row, out_row, pe_row};
  row_tables(p, l, threadIdx.x, t);
  __syncthreads();  // row tables
  with_width(p.vec_x[l.i], [&](auto v) { tile<decltype(v)::value>(x, pe, out, p, l, t, dsmem); });
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// dW: the forward's pipeline over the split's token steps (kernels/mma_tiles.h).
template <int VX, typename scalar_t>
__device__ __forceinline__ void dw_tile(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
                                        float* __restrict__ ws, const DwParams& p, const DwLoc& l, const int* koff,
                                        unsigned char* dsmem) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float acc[MT][NT][4];
  zero(acc);
  mainloop<true, kDwStageElems, scalar_t>(acc, dw_steps(l), dsmem, [&](int s, scalar_t* stage) {
    issue_dw_step<VX>(p, l, x, grad, koff, s, tid, stage);
  });
  for_each_acc_pair(warp, lane, [&](int r, int n, int mt, int nt, int half) {
    dw_store_pair<scalar_t>(p, l, ws, r, n, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
  });
}
#endif

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, TUBEVIT_MMA_MIN_BLOCKS)
    tube_dw_mma_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad, float* __restrict__ ws,
                       const DwParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char dsmem[];
  __shared__ int koff[BN];
  const DwLoc l = dw_locate(p, blockIdx.x);
  dw_koff(p, l, threadIdx.x, koff);
  __syncthreads();  // koff
  with_width(p.vec_x[l.i], [&](auto v) { dw_tile<decltype(v)::value>(x, grad, ws, p, l, koff, dsmem); });
#endif
}

// The splits' sum, in split order (dw_reduce), one element per thread.
template <typename scalar_t>
__global__ void tube_dw_mma_reduce_kernel(const float* __restrict__ ws, const DwParams p) {
  const int total = p.reduce_before[p.n_tubes];
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x)
    dw_reduce<scalar_t>(p, ws, e);
}

template <typename scalar_t>
void launch(const at::Tensor& x, const at::Tensor& pe, at::Tensor& out, const Params& p, unsigned grid,
            cudaStream_t stream) {
  constexpr int bytes = smem_bytes<scalar_t>();
  static_assert(bytes > 48 * 1024, "the opt-in below is what lets a block have more than 48 KiB");
  const auto kernel = tube_tokens_mma_kernel<scalar_t>;
  allow_smem<decltype(kernel)>(reinterpret_cast<const void*>(kernel), bytes, x.device().index());
  tube_tokens_mma_kernel<scalar_t><<<grid, kThreads, bytes, stream>>>(
      x.const_data_ptr<scalar_t>(), pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
      out.mutable_data_ptr<scalar_t>(), p);
}

}  // namespace

template <typename scalar_t>
void launch_dw(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& ws, const DwParams& p,
               unsigned grid, cudaStream_t stream) {
  constexpr int bytes = dw_smem_bytes<scalar_t>();
  static_assert(bytes > 48 * 1024, "the opt-in below is what lets a block have more than 48 KiB");
  const auto kernel = tube_dw_mma_kernel<scalar_t>;
  allow_smem<decltype(kernel)>(reinterpret_cast<const void*>(kernel), bytes, x.device().index());
  float* wsp = ws.defined() ? ws.mutable_data_ptr<float>() : nullptr;
  tube_dw_mma_kernel<scalar_t><<<grid, kThreads, bytes, stream>>>(x.const_data_ptr<scalar_t>(),
                                                                  grad.const_data_ptr<scalar_t>(), wsp, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int total = p.reduce_before[p.n_tubes];
  if (total > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
    tube_dw_mma_reduce_kernel<scalar_t><<<blocks, 256, 0, stream>>>(wsp, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool supported(const at::Tensor& x, const TubeLayout& L) {
  const auto t = x.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return false;
  if (L.tubes.size() > size_t(kMaxTubes)) return false;
  if (!fits_int32(L, x.sizes().data(), x.strides().data())) return false;
  return at::cuda::getDeviceProperties(x.device().index())->major >= 8;
}

void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  const void* wp[kMaxTubes];
  const void* bp[kMaxTubes];
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    wp[i] = w[i].const_data_ptr();
    bp[i] = bias.empty() ? nullptr : bias[i].const_data_ptr();
  }
  const Params p =
      make_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(), wp, bias.empty() ? nullptr : bp);
  const int64_t n_blocks = blocks(p);
  TORCH_CHECK(n_blocks < (int64_t(1) << 31), "tube_tokens (mma forward): problem too large for one launch (",
              n_blocks, " tiles)");
  if (n_blocks == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "tube_tokens_mma", [&] {  // fp16, bf16
    launch<scalar_t>(x, pe, out, p, static_cast<unsigned>(n_blocks), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


bool grad_weight_supported(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L) {
  return supported(x, L) && dw_takes(L, grad.const_data_ptr());
}

void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L, std::vector<at::Tensor>& dws) {
  void* dp[kMaxTubes];
  for (size_t i = 0; i < L.tubes.size(); ++i) dp[i] = dws[i].mutable_data_ptr();
  const int sms = at::cuda::getDeviceProperties(x.device().index())->multiProcessorCount;
  int64_t ws_elems = 0;
  const DwParams p =
      make_dw_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(), dp, 4 * int64_t(sms), &ws_elems);
  const int64_t n_blocks = dw_blocks(p);
  TORCH_CHECK(n_blocks < (int64_t(1) << 31), "tube_tokens_backward (mma dW): too many tiles (", n_blocks, ")");
  if (n_blocks == 0) return;
  at::Tensor ws;
  if (ws_elems > 0) ws = at::empty({ws_elems}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "tube_dw_mma", [&] {  // fp16, bf16
    launch_dw<scalar_t>(x, grad, ws, p, static_cast<unsigned>(n_blocks), stream);
  });
}

}  // namespace mma
}  // namespace tubevit
