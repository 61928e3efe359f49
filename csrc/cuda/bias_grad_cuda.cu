// Bias gradient of tubevit::tube_tokens on CUDA: db_i[j] = sum over the
// B x n_i rows of tube i of grad[b, off_i + tok, j].
//
// Why a kernel of its own: the per-element functor of kernels/naive_kernels.h gives
// each (tube, channel) one thread that walks all B x n_i rows, i.e. only
// n_tubes x d threads: on an H200 that was 12 blocks and 2.3 ms for the
// paper tubes at B = 32, d = 768 (ncu), more than the whole tensor-core
// forward; this reduction takes 0.025 ms (bench/DESIGN.md). Here the rows of each tube are split into chunks of
// kRows:
//   pass 1: a block of (32 channels x 8 row lanes) per (tube, chunk, channel
//           block); each thread sums every 8th row of the chunk, the 8 lanes
//           are combined in shared memory in a fixed order, and one partial
//           per (tube, chunk, channel) goes to a workspace;
//   pass 2: one thread per (tube, channel) adds its chunks in order.
// Sums in fp32 (fp64 for fp64 inputs): blocked, so the error stays that of
// ~sqrt-length sums, like PyTorch's own reductions.
// Fixed summation order, no atomics: bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "../kernels/common.h"
#include "bias_grad_cuda.h"

namespace tubevit {
namespace cuda {
namespace {

constexpr int kLanes = 8;   // row lanes per block
constexpr int kCols = 32;   // channels per block (one warp: coalesced rows)
constexpr int kRows = 256;  // rows per chunk

struct BiasParams {
  int64_t token_offset[kMaxTubes];  // first row of tube i in the N axis
  int64_t n_tok[kMaxTubes];         // n_i
  int64_t chunks_before[kMaxTubes + 1];
  void* db[kMaxTubes];              // (d,) outputs, scalar_t
  int n_tubes;
  int64_t B, N, d;
};

// Tube of flattened chunk index q (linear search over at most 16 tubes).
__device__ __forceinline__ int tube_of_chunk(const BiasParams& p, int64_t q) {
  int i = 0;
  while (i + 1 < p.n_tubes && q >= p.chunks_before[i + 1]) ++i;
  return i;
}

// part: (total chunks, d) of acc_t, row q = (tube, chunk) in chunks_before order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kCols* kLanes)
    bias_partial_kernel(const scalar_t* __restrict__ grad, acc_t* __restrict__ part, const BiasParams p) {
  __shared__ acc_t red[kLanes][kCols];
  const int64_t q = blockIdx.x;
  const int i = tube_of_chunk(p, q);
  const int64_t n = p.n_tok[i];
  const int64_t j = int64_t(blockIdx.y) * kCols + threadIdx.x;
  acc_t acc = 0;
  if (j < p.d) {
    const int64_t r0 = (q - p.chunks_before[i]) * kRows;
    const int64_t r_end = std::min<int64_t>(r0 + kRows, p.B * n);
    // row r = b * n + tok, walked with an incremental (b, tok): one division
    int64_t r = r0 + threadIdx.y, b = r / n, tok = r - b * n;
    for (; r < r_end; r += kLanes) {
      acc += static_cast<acc_t>(grad[(b * p.N + p.token_offset[i] + tok) * p.d + j]);
      tok += kLanes;
      while (tok >= n) {
        tok -= n;
        ++b;
      }
    }
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < p.d) {
    acc_t s = red[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < kLanes; ++y) s += red[y][threadIdx.x];
    part[q * p.d + j] = s;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bias_final_kernel(const acc_t* __restrict__ part, const BiasParams p) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= p.n_tubes * p.d) return;
  const int i = static_cast<int>(idx / p.d);
  const int64_t j = idx - i * p.d;
  acc_t s = 0;
  for (int64_t q = p.chunks_before[i]; q < p.chunks_before[i + 1]; ++q) s += part[q * p.d + j];
  static_cast<scalar_t*>(p.db[i])[j] = static_cast<scalar_t>(s);
}

}  // namespace

std::vector<at::Tensor> grad_bias(const at::Tensor& grad, const TubeLayout& L) {
  const int n_tubes = static_cast<int>(L.tubes.size());
  TORCH_CHECK(n_tubes <= kMaxTubes, "tube_tokens_backward (CUDA bias gradient): at most ", kMaxTubes,
              " tubes, got ", n_tubes);
  TORCH_CHECK(grad.is_contiguous() && grad.dim() == 3 && grad.size(0) == L.batch &&
                  grad.size(1) == L.num_tokens && grad.size(2) == L.dim,
              "grad_bias: grad must be contiguous (", L.batch, ", ", L.num_tokens, ", ", L.dim, "), got ",
              grad.sizes());
  std::vector<at::Tensor> dbs;
  for (int i = 0; i < n_tubes; ++i) dbs.push_back(at::empty({L.dim}, grad.options()));
  if (L.dim == 0 || n_tubes == 0) return dbs;
  BiasParams p{};
  p.n_tubes = n_tubes;
  p.B = L.batch;
  p.N = L.num_tokens;
  p.d = L.dim;
  p.chunks_before[0] = 0;
  for (int i = 0; i < n_tubes; ++i) {
    p.token_offset[i] = L.tubes[i].token_offset;
    p.n_tok[i] = L.tubes[i].num_tokens;
    p.chunks_before[i + 1] = p.chunks_before[i] + (L.batch * p.n_tok[i] + kRows - 1) / kRows;
  }
  const int64_t chunks = p.chunks_before[n_tubes];
  const int64_t col_blocks = (L.dim + kCols - 1) / kCols;
  TORCH_CHECK(chunks < (int64_t(1) << 31) && col_blocks < 65536,
              "tube_tokens_backward (CUDA bias gradient): problem too large for one launch (", chunks, " x ",
              col_blocks, " blocks)");
  for (int i = 0; i < n_tubes; ++i) p.db[i] = dbs[i].mutable_data_ptr();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "tube_tokens_grad_bias", [&] {
    using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
    // B = 0: no chunks, pass 2 writes zeros
    at::Tensor part = at::empty({std::max<int64_t>(chunks, 1), L.dim},
                                grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (chunks > 0) {
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(col_blocks));
      bias_partial_kernel<scalar_t, acc_t><<<grid, dim3(kCols, kLanes), 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t total = n_tubes * L.dim;
    bias_final_kernel<scalar_t, acc_t><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
        part.const_data_ptr<acc_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dbs;
}

}  // namespace cuda
}  // namespace tubevit
