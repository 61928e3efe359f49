// Tensor-core forward of tubevit::tube_tokens for fp16 / bf16, and for fp32
// as TF32 where PyTorch allows TF32 convolutions (sm_80+):
// ONE launch for all tubes and samples, a grouped implicit GEMM over tiles of
// (tube, sample, block of 64 tokens) x (block of 64 output channels).
//
//   A (tokens x K): patches gathered on the fly from x (any strides), never
//                   materialised in global memory; K ordered (c, kt, kh, kw)
//                   like weight.reshape(d, K), so the 3 input channels are
//                   not a blocking axis.
//   B (K x d):      the tube's weight, read as W[n, k] (col-major K x d).
//   C:              fp32 accumulators (WMMA 16x16x16, TF32 16x16x8; 4 warps,
//                   32x32 per warp);
//                   the epilogue adds bias and the position embedding, casts,
//                   and stores straight into the (B, N, d) output at the
//                   tube's row offset.
//
// The dP kernel of the input gradient (G_i W_i for every tube) uses the same
// tiles; the dX step that reads dP is cuda/grad_input_cuda.cu. All of them
// pass the CUDA test suite and compute-sanitizer memcheck / racecheck /
// initcheck on an H200; their tile logic (kernels/tc_tiles.h) also runs on
// the CPU through the host emulator (testing/tc_emulation.cpp,
// python_tests/test_tc_emulation.py). Speed: bench/RESULTS.md.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/version.h>

#include "../kernels/tc_tiles.h"
#include "cuda_launcher.cuh"
#include "tube_tokens_tc.h"

namespace tubevit {
namespace tc {
namespace {

using namespace nvcuda;

// Per input dtype: the WMMA fragment element type, the depth of one MMA
// (16 for fp16/bf16, 8 for TF32) and the type loads read from shared memory.
// fp32 inputs are staged as fp32 and rounded to TF32 in the fragments, which
// is what cuDNN does for fp32 convolutions when TF32 is allowed.
template <typename T>
struct Mma;
template <>
struct Mma<at::Half> {
  using frag = half;
  using load_t = half;
  static constexpr int kK = MmaDepth<at::Half>::value;
};
template <>
struct Mma<at::BFloat16> {
  using frag = __nv_bfloat16;
  using load_t = __nv_bfloat16;
  static constexpr int kK = MmaDepth<at::BFloat16>::value;
};
template <>
struct Mma<float> {
  using frag = wmma::precision::tf32;
  using load_t = float;
  static constexpr int kK = MmaDepth<float>::value;
};

// dW's A fragment layout (kernels/tc_tiles.h, kDwTokenMajorA)
using DwLayoutA = std::conditional<kDwTokenMajorA, wmma::col_major, wmma::row_major>::type;

template <typename scalar_t>
using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, Mma<scalar_t>::kK, float>;

// One kK-deep step of a warp's 32x32 tile, operands as described by MmaArgs
// (kernels/tc_tiles.h); A's and B's layouts are LayoutA / LayoutB. Both kernels below share it.
// Staging holds scalar_t (at::Half / at::BFloat16 / float), bit-identical
// to Mma<scalar_t>::load_t.
template <typename scalar_t, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_2x2(AccFrag<scalar_t> (&acc)[2][2], const scalar_t* As, const scalar_t* Bs,
                                        const MmaArgs& m) {
  const scalar_t* a = As + m.a_off;
  const scalar_t* b = Bs + m.b_off;
  const int a_step = m.a_step, lda = m.lda, b_step = m.b_step, ldb = m.ldb;
  using M = Mma<scalar_t>;
  using load_t = typename M::load_t;
  static_assert(sizeof(load_t) == sizeof(scalar_t), "layout-compatible staging types");
  wmma::fragment<wmma::matrix_a, 16, 16, M::kK, typename M::frag, LayoutA> fa[2];
  wmma::fragment<wmma::matrix_b, 16, 16, M::kK, typename M::frag, LayoutB> fb[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    wmma::load_matrix_sync(fa[i], reinterpret_cast<const load_t*>(a + i * a_step), lda);
    wmma::load_matrix_sync(fb[i], reinterpret_cast<const load_t*>(b + i * b_step), ldb);
    if constexpr (std::is_same<scalar_t, float>::value) {
#pragma unroll
      for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
#pragma unroll
      for (int t = 0; t < fb[i].num_elements; ++t) fb[i].x[t] = wmma::__float_to_tf32(fb[i].x[t]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
}

template <typename scalar_t>
__device__ __forceinline__ void zero_acc(AccFrag<scalar_t> (&acc)[2][2]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[a][c], 0.0f);
}

// The warp's four accumulator blocks into the fp32 tile Cs (acc_offset).
template <typename scalar_t>
__device__ __forceinline__ void store_acc(AccFrag<scalar_t> (&acc)[2][2], float* Cs, int warp) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(Cs + acc_offset(warp, a, c), acc[a][c], LDC, wmma::mem_row_major);
}

// One staged reduction step of each kernel: every kK-deep slice of the tiles.
template <typename scalar_t>
__device__ __forceinline__ void fwd_mma_step(AccFrag<scalar_t> (&acc)[2][2], const scalar_t* As, const scalar_t* Bs,
                                             int warp) {
#pragma unroll
  for (int ks = 0; ks < BK; ks += Mma<scalar_t>::kK)
    mma_2x2<scalar_t, wmma::row_major, wmma::col_major>(acc, As, Bs, fwd_mma_args(warp, ks));
}

template <typename scalar_t>
__device__ __forceinline__ void dw_mma_step(AccFrag<scalar_t> (&acc)[2][2], const scalar_t* As, const scalar_t* Bs,
                                            int warp) {
#pragma unroll
  for (int ks = 0; ks < DM; ks += Mma<scalar_t>::kK)
    mma_2x2<scalar_t, DwLayoutA, wmma::row_major>(acc, As, Bs, dw_mma_args(warp, ks));
}

// After the reduction loop: the accumulators go to the fp32 tile Cs, which
// aliases the staging bytes (hence the barrier before), then the epilogue.
template <typename scalar_t, class Epilogue>
__device__ __forceinline__ void finish_tile(AccFrag<scalar_t> (&acc)[2][2], float* Cs, int warp,
                                            const Epilogue& epilogue) {
  __syncthreads();
  store_acc<scalar_t>(acc, Cs, warp);
  __syncthreads();
  epilogue();
}

// cp.async bookkeeping of the 2-stage kernels (sm_80+).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// The forward. Tile logic (what each block / thread / warp does) is in
// kernels/tc_tiles.h, shared with the host emulator; here only shared
// memory, the barriers and the WMMA fragments. Two shared-memory stages: step
// s + 1's tiles are issued as cp.async before step s's MMAs, so their load
// latency overlaps the tensor-core work; the buffer / barrier order:
//   iteration s: koff of step s+1 -> koff[nxt]; wait for this thread's
//   copies of step s; barrier (step s's tiles and koff[nxt] visible, every
//   warp done with step s-1, whose buffers step s+1 now overwrites); issue
//   step s+1's copies into [nxt]; MMAs on [cur].
// Dynamic shared memory: 2 x (As + Bs), the fp32 accumulator tile aliases it
// after the loop.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, Traits::kMinBlocks)
    tube_tokens_tc2_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pe,
                           scalar_t* __restrict__ out, const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char dsmem[];
  __shared__ int64_t row_base[BM];
  __shared__ int64_t koff[2][BK];
  scalar_t* As[2] = {reinterpret_cast<scalar_t*>(dsmem), reinterpret_cast<scalar_t*>(dsmem) + (BM + BN) * LDS};
  scalar_t* Bs[2] = {As[0] + BM * LDS, As[1] + BM * LDS};
  float* Cs = reinterpret_cast<float*>(dsmem);
  const int tid = threadIdx.x, warp = tid / 32;
  const FwdLoc l = fwd_locate(p, blockIdx.x);
  const int64_t K = p.g[l.i].patch_size;
  const int64_t steps = (K + BK - 1) / BK;
  fwd_row_base(p, l, tid, row_base);
  FwdCols cols = fwd_cols_init(p, l, tid);

  AccFrag<scalar_t> acc[2][2];
  zero_acc<scalar_t>(acc);

  fwd_koff(p, l, cols, tid, koff[0]);
  __syncthreads();  // row_base, koff[0]
  fwd_fill_a<true>(p, l, x, row_base, koff[0], tid, As[0]);
  fwd_fill_b<true>(p, l, 0, tid, Bs[0]);
  cp_async_commit();
  for (int64_t s = 0; s < steps; ++s) {
    const int cur = static_cast<int>(s & 1), nxt = cur ^ 1;
    if (s + 1 < steps) fwd_koff(p, l, cols, tid, koff[nxt]);
    cp_async_wait_all();
    __syncthreads();
    if (s + 1 < steps) {
      fwd_fill_a<true>(p, l, x, row_base, koff[nxt], tid, As[nxt]);
      fwd_fill_b<true>(p, l, (s + 1) * BK, tid, Bs[nxt]);
      cp_async_commit();
    }
    fwd_mma_step<scalar_t>(acc, As[cur], Bs[cur], warp);
  }
  // no copies pending: the last step issued none
  finish_tile<scalar_t>(acc, Cs, warp, [&] { fwd_epilogue(p, l, Cs, pe, tid, out); });
#endif
}

// ---- weight gradient: dW_i = G_i^T P_i (see kernels/tc_tiles.h) ----
// Two shared-memory stages, the same buffer / barrier order as
// tube_tokens_tc2_kernel: step s + 1's token rows go to
// [nxt] before the barrier, its tiles are issued after it, then step s's MMAs.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, Traits::kMinBlocks)
    tube_dw_tc2_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad, const ParamsDW p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char dsmem[];
  __shared__ int64_t row_base[2][DM];
  __shared__ int64_t grad_row[2][DM];
  __shared__ int64_t koff[BN];
  constexpr int kStage = kDwARows * LDA2 + DM * LDB2;  // elements of one stage
  scalar_t* As[2] = {reinterpret_cast<scalar_t*>(dsmem), reinterpret_cast<scalar_t*>(dsmem) + kStage};
  scalar_t* Bs[2] = {As[0] + kDwARows * LDA2, As[1] + kDwARows * LDA2};
  float* Cs = reinterpret_cast<float*>(dsmem);
  const int tid = threadIdx.x, warp = tid / 32;
  const DwLoc l = dw_locate(p, blockIdx.x);
  const int64_t M = p.B * p.g[l.i].num_tokens;
  const int64_t steps = (M + DM - 1) / DM;
  dw_koff(p, l, tid, koff);

  AccFrag<scalar_t> acc[2][2];
  zero_acc<scalar_t>(acc);

  dw_rows(p, l, 0, tid, row_base[0], grad_row[0]);
  __syncthreads();  // koff, rows of step 0
  dw_fill_a<true>(p, l, grad, grad_row[0], tid, As[0]);
  dw_fill_b<true>(p, l, x, row_base[0], koff, tid, Bs[0]);
  cp_async_commit();
  for (int64_t s = 0; s < steps; ++s) {
    const int cur = static_cast<int>(s & 1), nxt = cur ^ 1;
    if (s + 1 < steps) dw_rows(p, l, (s + 1) * DM, tid, row_base[nxt], grad_row[nxt]);
    cp_async_wait_all();
    __syncthreads();
    if (s + 1 < steps) {
      dw_fill_a<true>(p, l, grad, grad_row[nxt], tid, As[nxt]);
      dw_fill_b<true>(p, l, x, row_base[nxt], koff, tid, Bs[nxt]);
      cp_async_commit();
    }
    dw_mma_step<scalar_t>(acc, As[cur], Bs[cur], warp);
  }
  finish_tile<scalar_t>(acc, Cs, warp, [&] { dw_epilogue<scalar_t>(p, l, Cs, tid); });
#endif
}

// ---- input gradient, step 1: dP = G W into an fp32 workspace (kernels/tc_tiles.h) ----
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tube_dp_tc_kernel(const scalar_t* __restrict__ grad, float* __restrict__ dp, const ParamsDX p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) unsigned char smem[dx_smem_bytes<scalar_t>()];
  __shared__ int64_t grad_row[BM];
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);  // [BM tokens][LDS]
  scalar_t* Bs = As + BM * LDS;                       // [BK d][LDB2]
  float* Cs = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, warp = tid / 32;
  const DxLoc l = dx_locate(p, blockIdx.x);
  dx_rows(p, l, tid, grad_row);  // published by the loop's first barrier

  AccFrag<scalar_t> acc[2][2];
  zero_acc<scalar_t>(acc);

  for (int64_t j0 = 0; j0 < p.d; j0 += BK) {
    __syncthreads();  // previous tiles consumed (first pass: grad_row ready)
    dx_fill_a(p, grad, grad_row, j0, tid, As);
    dx_fill_b(p, l, j0, tid, Bs);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += Mma<scalar_t>::kK)
      mma_2x2<scalar_t, wmma::row_major, wmma::row_major>(acc, As, Bs, dx_mma_args(warp, ks));
  }
  finish_tile<scalar_t>(acc, Cs, warp, [&] { dx_epilogue(p, l, Cs, tid, dp); });
#endif
}

}  // namespace

// torch.backends.cudnn.allow_tf32 (conv). Since PyTorch 2.9 the flag is per
// operation, and asking without naming one throws when conv and RNN differ.
#ifndef TORCH_VERSION_MINOR
#error "torch/version.h did not define TORCH_VERSION_MINOR"
#endif
bool tf32_conv_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

// Whether ATen's fp32 cuBLAS GEMMs may use reduced precision (TF32, or BF16
// under set_float32_matmul_precision("medium")): the question ATen's own
// fp32 GEMM asks before it picks cuBLAS's math mode.
bool tf32_matmul_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  const auto p = at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  const void* wp[kMaxTubes];
  const void* bp[kMaxTubes];
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    wp[i] = w[i].const_data_ptr();
    bp[i] = bias.empty() ? nullptr : bias[i].const_data_ptr();
  }
  const Params p = make_fwd_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(), wp,
                                   bias.empty() ? nullptr : bp);
  const int64_t blocks = fwd_blocks(p);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "tube_tokens (tensor-core path): problem too large for one launch (",
              blocks, " tiles)");
  if (blocks == 0) return;
  const dim3 grid(static_cast<unsigned>(blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  TUBEVIT_DISPATCH_TC_TYPES(x.scalar_type(), "tube_tokens_tc", [&] {
    const scalar_t* pe_ptr = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
    constexpr int bytes = fwd_smem_bytes<scalar_t>(2);
    // above 48 KiB (fp32: 74 KiB) a kernel must opt in to that much dynamic shared memory
    const auto kernel = tube_tokens_tc2_kernel<scalar_t>;
    if (bytes > 48 * 1024)
      allow_smem<decltype(kernel)>(reinterpret_cast<const void*>(kernel), bytes, x.device().index());
    tube_tokens_tc2_kernel<scalar_t><<<grid, kThreads, bytes, stream>>>(x.const_data_ptr<scalar_t>(), pe_ptr,
                                                                        out.mutable_data_ptr<scalar_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor grad_dp(const at::Tensor& x, const at::Tensor& grad, const std::vector<at::Tensor>& w,
                   const TubeLayout& L) {
  const void* wp[kMaxTubes];
  for (size_t i = 0; i < L.tubes.size(); ++i) wp[i] = w[i].const_data_ptr();
  int64_t dp_elems = 0;
  const ParamsDX p = make_dx_params(L, wp, &dp_elems);
  const int64_t tiles = p.tiles_before[p.n_tubes];
  TORCH_CHECK(tiles < (int64_t(1) << 31), "tube_tokens_backward (tensor-core path): too many tiles (", tiles, ")");
  at::Tensor dp = at::empty({dp_elems}, x.options().dtype(at::kFloat));
  if (tiles == 0) return dp;
  auto stream = at::cuda::getCurrentCUDAStream();
  TUBEVIT_DISPATCH_TC_TYPES(x.scalar_type(), "tube_dp_tc", [&] {
    tube_dp_tc_kernel<scalar_t><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), dp.mutable_data_ptr<float>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dp;
}

void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L,
                 std::vector<at::Tensor>& dws) {
  void* dp[kMaxTubes];
  for (size_t i = 0; i < L.tubes.size(); ++i) dp[i] = dws[i].mutable_data_ptr();
  const ParamsDW p = make_dw_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(),
                                    grad.const_data_ptr(), dp);
  const int64_t tiles = p.tiles_before[p.n_tubes];
  TORCH_CHECK(tiles < (int64_t(1) << 31), "tube_tokens_backward (tensor-core path): too many tiles (", tiles, ")");
  if (tiles == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  TUBEVIT_DISPATCH_TC_TYPES(x.scalar_type(), "tube_dw_tc", [&] {
    constexpr int bytes = dw_smem_bytes<scalar_t>(2);
    const auto kernel = tube_dw_tc2_kernel<scalar_t>;
    if (bytes > 48 * 1024)
      allow_smem<decltype(kernel)>(reinterpret_cast<const void*>(kernel), bytes, x.device().index());
    tube_dw_tc2_kernel<scalar_t><<<static_cast<unsigned>(tiles), kThreads, bytes, stream>>>(
        x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tc
}  // namespace tubevit
