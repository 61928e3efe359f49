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
// STATUS: compiled in CI, NOT YET RUN ON A GPU (no GPU was available when it
// was written). It is therefore opt-in: TUBEVIT_CUDA_TC=1 selects it; the
// default CUDA path stays the verified-on-CPU naive kernels. bench/NOTES.md
// lists what a GPU session must check before making it the default.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/version.h>

#include "tube_tokens_tc.h"

namespace tubevit {
namespace tc {
namespace {

using namespace nvcuda;

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int LDS = BK + 8;  // padded smem row (elements) to spread banks
constexpr int LDC = BN + 4;  // padded fp32 epilogue row
constexpr int kMaxTubesTC = 16;

struct Params {
  TubeGeom g[kMaxTubesTC];
  const void* w[kMaxTubesTC];     // (d, K) row-major, scalar_t
  const void* bias[kMaxTubesTC];  // (d,) or nullptr
  int64_t tiles_before[kMaxTubesTC + 1];  // prefix over tubes of B * ceil(n_i / BM)
  int n_tubes;
  int64_t B, N, d;
  int64_t sB, sC, sT, sH, sW;  // x strides (elements)
};

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
  static constexpr int kK = 16;
};
template <>
struct Mma<at::BFloat16> {
  using frag = __nv_bfloat16;
  using load_t = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct Mma<float> {
  using frag = wmma::precision::tf32;
  using load_t = float;
  static constexpr int kK = 8;
};

template <typename scalar_t>
using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, Mma<scalar_t>::kK, float>;

// One kK-deep step of a warp's 32x32 tile: acc[a][c] += A(a) * B(c) with
// A(a) = the 16 x kK block at a + a * a_step (row-major, leading dim lda)
// and B(c) = the kK x 16 block at b + c * b_step (layout LayoutB, leading
// dim ldb). Both kernels below share it; only their staging layouts differ.
// Staging holds scalar_t (at::Half / at::BFloat16 / float), bit-identical
// to Mma<scalar_t>::load_t.
template <typename scalar_t, typename LayoutB>
__device__ __forceinline__ void mma_2x2(AccFrag<scalar_t> (&acc)[2][2], const scalar_t* a, int a_step, int lda,
                                        const scalar_t* b, int b_step, int ldb) {
  using M = Mma<scalar_t>;
  using load_t = typename M::load_t;
  static_assert(sizeof(load_t) == sizeof(scalar_t), "layout-compatible staging types");
  wmma::fragment<wmma::matrix_a, 16, 16, M::kK, typename M::frag, wmma::row_major> fa[2];
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
__global__ void __launch_bounds__(kThreads)
    tube_tokens_tc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pe,
                          scalar_t* __restrict__ out, const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Shared memory: the A/B staging tiles and the fp32 epilogue tile share
  // the same bytes (the epilogue runs after the last MMA).
  constexpr int kStageBytes = (BM + BN) * LDS * int(sizeof(scalar_t));
  constexpr int kEpiBytes = BM * LDC * int(sizeof(float));
  constexpr int kSmemBytes = kStageBytes > kEpiBytes ? kStageBytes : kEpiBytes;
  __shared__ __align__(32) unsigned char smem[kSmemBytes];
  __shared__ int64_t row_base[BM];
  __shared__ int64_t koff[BK];  // input offset of each of this step's patch columns
  // Staged as at::Half / at::BFloat16 / float (the 16-bit ones convert from
  // float under torch's __CUDA_NO_HALF_CONVERSIONS__), read by WMMA as the
  // bit-identical half / __nv_bfloat16 / float.
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = As + BM * LDS;
  float* Cs = reinterpret_cast<float*>(smem);

  // Which (tube, sample, token block) this block owns.
  const int64_t tile = blockIdx.x;
  int i = 0;
  while (i + 1 < p.n_tubes && tile >= p.tiles_before[i + 1]) ++i;
  const TubeGeom& g = p.g[i];
  const int64_t m_tiles = (g.num_tokens + BM - 1) / BM;
  const int64_t local = tile - p.tiles_before[i];
  const int64_t b = local / m_tiles;
  const int64_t m0 = (local % m_tiles) * BM;
  const int64_t n0 = int64_t(blockIdx.y) * BN;
  const int64_t K = g.patch_size;
  const scalar_t* __restrict__ w = static_cast<const scalar_t*>(p.w[i]);

  // Input offset of each row's (token's) first voxel; -1 past the tube's end.
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t tok = m0 + r;
    if (tok < g.num_tokens) {
      row_base[r] = b * p.sB + token_origin_offset(g, tok, p.sT, p.sH, p.sW);
    } else {
      row_base[r] = -1;
    }
  }

  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // warp's 32x32 sub-tile
  AccFrag<scalar_t> acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[a][c], 0.0f);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // previous tiles and column offsets consumed
    // This step's BK column offsets, once per block: the (c, kt, kh, kw)
    // decomposition is four 64-bit divisions, too slow per element.
    if (threadIdx.x < BK) {
      const int64_t k = k0 + threadIdx.x;
      koff[threadIdx.x] = k < K ? patch_column_offset(g, k, p.sC, p.sT, p.sH, p.sW) : -1;
    }
    __syncthreads();  // row_base (first pass) and koff ready
    // A tile: BM x BK gathered patch elements (zero outside the tube / K).
    for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
      const int r = e / BK, kk = e % BK;
      const int64_t base = row_base[r], off = koff[kk];
      As[r * LDS + kk] = base >= 0 && off >= 0 ? x[base + off] : scalar_t(0.0f);
    }
    // B tile: BN x BK weights W[n0 + n, k0 + kk] (contiguous along k).
    for (int e = threadIdx.x; e < BN * BK; e += kThreads) {
      const int n = e / BK, kk = e % BK;
      const int64_t k = k0 + kk, col = n0 + n;
      Bs[n * LDS + kk] = (col < p.d && k < K) ? w[col * K + k] : scalar_t(0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += Mma<scalar_t>::kK) {
      // B staged as Bs[n][k]: column-major K x N, 16 columns apart = 16 rows of Bs
      mma_2x2<scalar_t, wmma::col_major>(acc, As + wm * LDS + ks, 16 * LDS, LDS, Bs + wn * LDS + ks, 16 * LDS, LDS);
    }
  }
  __syncthreads();  // staging tiles dead: reuse the bytes for the epilogue
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(Cs + (wm + 16 * a) * LDC + wn + 16 * c, acc[a][c], LDC, wmma::mem_row_major);
  __syncthreads();

  // Epilogue: + bias + pe, cast, store into the tube's rows of out.
  const scalar_t* __restrict__ bias = static_cast<const scalar_t*>(p.bias[i]);
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, n = e % BN;
    const int64_t tok = m0 + r, col = n0 + n;
    if (tok >= g.num_tokens || col >= p.d) continue;
    float v = Cs[r * LDC + n];
    if (bias != nullptr) v += static_cast<float>(bias[col]);
    const int64_t row = g.token_offset + tok;
    if (pe != nullptr) v += static_cast<float>(pe[row * p.d + col]);
    out[(b * p.N + row) * p.d + col] = static_cast<scalar_t>(v);
  }
#endif
}

// ---- weight gradient: dW_i (d x K_i) = G_i^T (d x M_i) * P_i (M_i x K_i) ----
// M_i = B * n_i tokens of tube i; one launch for all tubes, tiles of
// (tube, 64 output channels j, 64 patch columns k), the reduction over M in
// steps of 32 tokens. A = G^T comes from the gradient rows (coalesced along
// j, transposed into shared memory); B = P is gathered from x on the fly.
// No atomics and a fixed reduction order: deterministic.
constexpr int DM = 32;           // tokens per reduction step
constexpr int LDA2 = DM + 8;     // As[j][m]
constexpr int LDB2 = BN + 8;     // Bs[m][k]

struct ParamsDW {
  TubeGeom g[kMaxTubesTC];
  void* dw[kMaxTubesTC];                  // (d, K) row-major, scalar_t
  int64_t tiles_before[kMaxTubesTC + 1];  // prefix of ceil(d/64) * ceil(K_i/64)
  int n_tubes;
  int64_t B, N, d;
  int64_t sB, sC, sT, sH, sW;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tube_dw_tc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad, const ParamsDW p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kStageBytes = (BM * LDA2 + DM * LDB2) * int(sizeof(scalar_t));
  constexpr int kEpiBytes = BM * LDC * int(sizeof(float));
  constexpr int kSmemBytes = kStageBytes > kEpiBytes ? kStageBytes : kEpiBytes;
  __shared__ __align__(32) unsigned char smem[kSmemBytes];
  __shared__ int64_t row_base[DM];  // x offset of each token's first voxel
  __shared__ int64_t grad_row[DM];  // row of grad for each token (-1 past M)
  __shared__ int64_t koff[BN];      // input offset of this block's patch columns (-1 past K)
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);  // [BM j][LDA2]
  scalar_t* Bs = As + BM * LDA2;                      // [DM m][LDB2]
  float* Cs = reinterpret_cast<float*>(smem);

  const int64_t tile = blockIdx.x;
  int i = 0;
  while (i + 1 < p.n_tubes && tile >= p.tiles_before[i + 1]) ++i;
  const TubeGeom& g = p.g[i];
  const int64_t K = g.patch_size, n = g.num_tokens, M = p.B * n;
  const int64_t k_tiles = (K + BN - 1) / BN;
  const int64_t local = tile - p.tiles_before[i];
  const int64_t j0 = (local / k_tiles) * BM, c0 = (local % k_tiles) * BN;
  // The block's patch columns are fixed: decompose them once (the loop's
  // first barrier publishes them).
  for (int kk = threadIdx.x; kk < BN; kk += kThreads) {
    const int64_t k = c0 + kk;
    koff[kk] = k < K ? patch_column_offset(g, k, p.sC, p.sT, p.sH, p.sW) : -1;
  }

  const int warp = threadIdx.x / 32;
  const int wj = (warp / 2) * 32, wk = (warp % 2) * 32;
  AccFrag<scalar_t> acc[2][2];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[a][c], 0.0f);

  for (int64_t m0 = 0; m0 < M; m0 += DM) {
    __syncthreads();  // previous step's tiles consumed
    for (int r = threadIdx.x; r < DM; r += kThreads) {
      const int64_t m = m0 + r;
      if (m < M) {
        const int64_t b = m / n, tok = m % n;
        row_base[r] = b * p.sB + token_origin_offset(g, tok, p.sT, p.sH, p.sW);
        grad_row[r] = b * p.N + g.token_offset + tok;
      } else {
        row_base[r] = -1;
        grad_row[r] = -1;
      }
    }
    __syncthreads();
    // A = G^T tile: As[j][mm] = grad[grad_row[mm], j0 + j]
    for (int e = threadIdx.x; e < BM * DM; e += kThreads) {
      const int mm = e / BM, j = e % BM;
      const int64_t gr = grad_row[mm], col = j0 + j;
      As[j * LDA2 + mm] = (gr >= 0 && col < p.d) ? grad[gr * p.d + col] : scalar_t(0.0f);
    }
    // B = P tile: Bs[mm][kk] = x[row_base[mm] + offset(c0 + kk)]
    for (int e = threadIdx.x; e < DM * BN; e += kThreads) {
      const int mm = e / BN, kk = e % BN;
      const int64_t base = row_base[mm], off = koff[kk];
      Bs[mm * LDB2 + kk] = base >= 0 && off >= 0 ? x[base + off] : scalar_t(0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < DM; ks += Mma<scalar_t>::kK) {
      // B staged as Bs[m][k]: row-major, 16 columns apart = 16 elements
      mma_2x2<scalar_t, wmma::row_major>(acc, As + wj * LDA2 + ks, 16 * LDA2, LDA2, Bs + ks * LDB2 + wk, 16, LDB2);
    }
  }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(Cs + (wj + 16 * a) * LDC + wk + 16 * c, acc[a][c], LDC, wmma::mem_row_major);
  __syncthreads();
  scalar_t* __restrict__ dw = static_cast<scalar_t*>(p.dw[i]);
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int j = e / BN, kk = e % BN;
    const int64_t row = j0 + j, col = c0 + kk;
    if (row < p.d && col < K) dw[row * K + col] = static_cast<scalar_t>(Cs[j * LDC + kk]);
  }
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

bool supported(const at::Tensor& x, const TubeLayout& L) {
  const auto t = x.scalar_type();
  // fp32 only where PyTorch lets convolutions use TF32 (cuDNN's switch,
  // torch.backends.cudnn.allow_tf32, on by default); else exact fp32 kernels.
  const bool tf32 = t == at::kFloat && tf32_conv_allowed();
  if (t != at::kHalf && t != at::kBFloat16 && !tf32) return false;
  if (L.tubes.size() > size_t(kMaxTubesTC)) return false;
  const auto* prop = at::cuda::getDeviceProperties(x.device().index());
  return prop->major >= 8;
}

// Fields both kernels' parameter blocks share: sizes, x strides, geometry.
template <typename P>
void fill_common(P& p, const at::Tensor& x, const TubeLayout& L) {
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.B = L.batch;
  p.N = L.num_tokens;
  p.d = L.dim;
  p.sB = x.stride(0);
  p.sC = x.stride(1);
  p.sT = x.stride(2);
  p.sH = x.stride(3);
  p.sW = x.stride(4);
  p.tiles_before[0] = 0;
  for (int i = 0; i < p.n_tubes; ++i) p.g[i] = L.tubes[i];
}

void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  Params p{};
  fill_common(p, x, L);
  for (int i = 0; i < p.n_tubes; ++i) {
    p.w[i] = w[i].const_data_ptr();
    p.bias[i] = bias.empty() ? nullptr : bias[i].const_data_ptr();
    p.tiles_before[i + 1] = p.tiles_before[i] + L.batch * ((L.tubes[i].num_tokens + BM - 1) / BM);
  }
  const int64_t m_tiles = p.tiles_before[p.n_tubes];
  const int64_t n_tiles = (L.dim + BN - 1) / BN;
  TORCH_CHECK(m_tiles < (int64_t(1) << 31) && n_tiles < 65536,
              "tube_tokens (tensor-core path): problem too large for one launch (", m_tiles, " x ", n_tiles,
              " tiles)");
  if (m_tiles == 0) return;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(x.scalar_type(), "tube_tokens_tc",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       tube_tokens_tc_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(), p);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       tube_tokens_tc_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(), p);
                     }) AT_DISPATCH_CASE(at::kFloat, [&] {
                       tube_tokens_tc_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(), p);
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tc
}  // namespace tubevit

namespace tubevit {
namespace tc {

void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L,
                 std::vector<at::Tensor>& dws) {
  ParamsDW p{};
  fill_common(p, x, L);
  for (int i = 0; i < p.n_tubes; ++i) {
    p.dw[i] = dws[i].mutable_data_ptr();
    p.tiles_before[i + 1] =
        p.tiles_before[i] + ((L.dim + BM - 1) / BM) * ((L.tubes[i].patch_size + BN - 1) / BN);
  }
  const int64_t tiles = p.tiles_before[p.n_tubes];
  TORCH_CHECK(tiles < (int64_t(1) << 31), "tube_tokens_backward (tensor-core path): too many tiles (", tiles, ")");
  if (tiles == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(x.scalar_type(), "tube_dw_tc",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       tube_dw_tc_kernel<scalar_t><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), p);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       tube_dw_tc_kernel<scalar_t><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), p);
                     }) AT_DISPATCH_CASE(at::kFloat, [&] {
                       tube_dw_tc_kernel<scalar_t><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
                           x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), p);
                     }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tc
}  // namespace tubevit
