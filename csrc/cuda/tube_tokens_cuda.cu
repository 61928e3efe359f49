// CUDA backend of tubevit::tube_tokens and tubevit::tube_tokens_backward:
// the correctness-first version (issue 2). One thread per output element,
// fp32 (fp64 for double) accumulation, no atomics, so results are
// deterministic. The tensor-core implicit-GEMM kernels are issue 3; these
// stay as the reference GPU path for them.
//
// All launches: current stream, device guard, checked, skipped when empty
// (a zero-sized grid is an invalid launch). All indices are int64_t.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../tube_tokens.h"

namespace tubevit {
namespace {

// Tube geometry passed by value in kernel parameter space (< 4 KiB).
constexpr int kMaxTubes = 16;

template <typename scalar_t>
struct TubeArgs {
  TubeGeom g[kMaxTubes];
  const scalar_t* w[kMaxTubes];  // (d, K) row-major per tube
  const scalar_t* bias[kMaxTubes];  // (d,) or nullptr
  int64_t w_offset[kMaxTubes + 1];  // prefix sums of d * K over tubes
  int n_tubes;
};

// Per-tube gradient outputs: separate allocations, because outputs of a
// dispatcher op must not alias one another.
template <typename scalar_t>
struct GradPtrs {
  scalar_t* dw[kMaxTubes];  // (d, K) per tube
  scalar_t* db[kMaxTubes];  // (d,) per tube
};

// Input strides in elements: any layout is read in place.
struct Strides5 {
  int64_t b, c, t, h, w;
};

__device__ __forceinline__ int find_tube_by_token(const TubeGeom* g, int n_tubes,
                                                  int64_t token) {
  int i = 0;
  while (i + 1 < n_tubes && token >= g[i + 1].token_offset) ++i;
  return i;
}

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t work) {
  // Grid-stride loops cover the rest; cap keeps the grid well inside limits.
  return std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20);
}

// out[b, tok, j] = sum_k P[b, tok, k] * W[j, k] + bias[j] + pe[tok, j]
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, Strides5 xs,
                               TubeArgs<scalar_t> args,
                               const scalar_t* __restrict__ pe,
                               scalar_t* __restrict__ out, int64_t B, int64_t N,
                               int64_t d, int64_t C) {
  const int64_t total = B * N * d;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % d;
    const int64_t token = (idx / d) % N;
    const int64_t b = idx / (d * N);
    const int i = find_tube_by_token(args.g, args.n_tubes, token);
    const TubeGeom& g = args.g[i];
    const int64_t tok = token - g.token_offset;
    const int64_t iw = tok % g.n[2];
    const int64_t ih = (tok / g.n[2]) % g.n[1];
    const int64_t it = tok / (g.n[2] * g.n[1]);
    const scalar_t* src0 = x + b * xs.b + (g.o[0] + g.s[0] * it) * xs.t +
                           (g.o[1] + g.s[1] * ih) * xs.h + (g.o[2] + g.s[2] * iw) * xs.w;
    const scalar_t* wrow = args.w[i] + j * g.patch_size;
    acc_t acc = 0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t a = 0; a < g.k[0]; ++a)
        for (int64_t h = 0; h < g.k[1]; ++h) {
          const scalar_t* src = src0 + c * xs.c + a * xs.t + h * xs.h;
          for (int64_t w = 0; w < g.k[2]; ++w)
            acc += static_cast<acc_t>(src[w * xs.w]) * static_cast<acc_t>(*wrow++);
        }
    if (args.bias[i] != nullptr) acc += static_cast<acc_t>(args.bias[i][j]);
    if (pe != nullptr) acc += static_cast<acc_t>(pe[token * d + j]);
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// dW[i][j, k] = sum_{b, tok} G[b, off_i + tok, j] * P_i[b, tok, k]
template <typename scalar_t, typename acc_t>
__global__ void grad_weight_kernel(const scalar_t* __restrict__ x, Strides5 xs,
                                   TubeArgs<scalar_t> args,
                                   const scalar_t* __restrict__ grad,
                                   GradPtrs<scalar_t> out, int64_t B, int64_t N,
                                   int64_t d) {
  const int64_t total = args.w_offset[args.n_tubes];
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int i = 0;
    while (i + 1 < args.n_tubes && idx >= args.w_offset[i + 1]) ++i;
    const TubeGeom& g = args.g[i];
    const int64_t local = idx - args.w_offset[i];
    const int64_t j = local / g.patch_size, k = local % g.patch_size;
    const int64_t kw = k % g.k[2];
    const int64_t kh = (k / g.k[2]) % g.k[1];
    const int64_t kt = (k / (g.k[2] * g.k[1])) % g.k[0];
    const int64_t c = k / (g.k[2] * g.k[1] * g.k[0]);
    acc_t acc = 0;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* xb = x + b * xs.b + c * xs.c + (g.o[0] + kt) * xs.t +
                           (g.o[1] + kh) * xs.h + (g.o[2] + kw) * xs.w;
      const scalar_t* gb = grad + (b * N + g.token_offset) * d + j;
      for (int64_t it = 0; it < g.n[0]; ++it)
        for (int64_t ih = 0; ih < g.n[1]; ++ih)
          for (int64_t iw = 0; iw < g.n[2]; ++iw) {
            const int64_t tok = (it * g.n[1] + ih) * g.n[2] + iw;
            acc += static_cast<acc_t>(gb[tok * d]) *
                   static_cast<acc_t>(xb[g.s[0] * it * xs.t + g.s[1] * ih * xs.h +
                                         g.s[2] * iw * xs.w]);
          }
    }
    out.dw[i][local] = static_cast<scalar_t>(acc);
  }
}

// db[i][j] = sum_{b, tok} G[b, off_i + tok, j]
template <typename scalar_t, typename acc_t>
__global__ void grad_bias_kernel(TubeArgs<scalar_t> args,
                                 const scalar_t* __restrict__ grad,
                                 GradPtrs<scalar_t> out, int64_t B, int64_t N,
                                 int64_t d) {
  const int64_t total = int64_t(args.n_tubes) * d;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx / d);
    const int64_t j = idx % d;
    const TubeGeom& g = args.g[i];
    acc_t acc = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t tok = 0; tok < g.num_tokens; ++tok)
        acc += static_cast<acc_t>(grad[(b * N + g.token_offset + tok) * d + j]);
    out.db[i][j] = static_cast<scalar_t>(acc);
  }
}

// Gather form of the input gradient: every voxel sums, over every tube and
// every token whose window covers it, G[token, :] . W[:, c, dt, dh, dw].
// Overlaps (within and across tubes) need no atomics this way.
template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(TubeArgs<scalar_t> args,
                                  const scalar_t* __restrict__ grad,
                                  scalar_t* __restrict__ dx, int64_t B, int64_t C,
                                  int64_t T, int64_t H, int64_t W, int64_t N,
                                  int64_t d) {
  const int64_t total = B * C * T * H * W;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = idx % W;
    const int64_t h = (idx / W) % H;
    const int64_t t = (idx / (W * H)) % T;
    const int64_t c = (idx / (W * H * T)) % C;
    const int64_t b = idx / (W * H * T * C);
    acc_t acc = 0;
    for (int i = 0; i < args.n_tubes; ++i) {
      const TubeGeom& g = args.g[i];
      int64_t t0, t1, h0, h1, w0, w1;
      axis_covering(t, g.k[0], g.s[0], g.o[0], g.n[0], &t0, &t1);
      axis_covering(h, g.k[1], g.s[1], g.o[1], g.n[1], &h0, &h1);
      axis_covering(w, g.k[2], g.s[2], g.o[2], g.n[2], &w0, &w1);
      for (int64_t it = t0; it <= t1; ++it)
        for (int64_t ih = h0; ih <= h1; ++ih)
          for (int64_t iw = w0; iw <= w1; ++iw) {
            const int64_t tok = (it * g.n[1] + ih) * g.n[2] + iw;
            const int64_t k =
                ((c * g.k[0] + (t - g.o[0] - g.s[0] * it)) * g.k[1] +
                 (h - g.o[1] - g.s[1] * ih)) * g.k[2] + (w - g.o[2] - g.s[2] * iw);
            const scalar_t* gr = grad + (b * N + g.token_offset + tok) * d;
            const scalar_t* wc = args.w[i] + k;
            for (int64_t j = 0; j < d; ++j)
              acc += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wc[j * g.patch_size]);
          }
    }
    dx[idx] = static_cast<scalar_t>(acc);
  }
}

// Fills geometry and weight pointers; weights must already be contiguous.
template <typename scalar_t>
TubeArgs<scalar_t> make_args(const TubeLayout& L, const std::vector<at::Tensor>& w,
                             const std::vector<at::Tensor>& bias) {
  TORCH_CHECK(L.tubes.size() <= size_t(kMaxTubes), "the CUDA backend supports at most ",
              kMaxTubes, " tubes, got ", L.tubes.size());
  TubeArgs<scalar_t> a{};
  a.n_tubes = static_cast<int>(L.tubes.size());
  a.w_offset[0] = 0;
  for (int i = 0; i < a.n_tubes; ++i) {
    a.g[i] = L.tubes[i];
    a.w[i] = w[i].const_data_ptr<scalar_t>();
    a.bias[i] = bias.empty() ? nullptr : bias[i].const_data_ptr<scalar_t>();
    a.w_offset[i + 1] = a.w_offset[i] + L.dim * L.tubes[i].patch_size;
  }
  return a;
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

Strides5 strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
}

at::Tensor tube_tokens_cuda(const at::Tensor& x, at::TensorList weights,
                            at::TensorList biases, at::IntArrayRef tubes,
                            const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  const auto w = contiguous_all(weights);
  const auto bias = contiguous_all(biases);
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "tube_tokens_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_args<scalar_t>(L, w, bias);
    forward_kernel<scalar_t, acc_t><<<num_blocks(out.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), args,
        pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), L.batch, L.num_tokens, L.dim, L.channels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
tube_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                          at::TensorList weights, at::IntArrayRef tubes,
                          std::array<bool, 3> output_mask) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = contiguous_all(weights);
  const at::Tensor grad = grad_out.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_tubes = static_cast<int64_t>(L.tubes.size());

  at::Tensor dx = at::empty({0}, x.options());
  std::vector<at::Tensor> dws, dbs;
  if (output_mask[0]) dx = at::empty({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, x.options());
  for (int64_t i = 0; i < n_tubes; ++i) {
    if (output_mask[1]) dws.push_back(at::empty(weights[i].sizes(), x.options()));
    if (output_mask[2]) dbs.push_back(at::empty({L.dim}, x.options()));
  }
  int64_t w_total = 0;
  for (const auto& g : L.tubes) w_total += L.dim * g.patch_size;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "tube_tokens_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto args = make_args<scalar_t>(L, w, {});
    GradPtrs<scalar_t> gptr{};
    for (int64_t i = 0; i < n_tubes; ++i) {
      if (output_mask[1]) gptr.dw[i] = dws[i].mutable_data_ptr<scalar_t>();
      if (output_mask[2]) gptr.db[i] = dbs[i].mutable_data_ptr<scalar_t>();
    }
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    if (output_mask[0] && dx.numel() > 0) {
      grad_input_kernel<scalar_t, acc_t><<<num_blocks(dx.numel()), kThreads, 0, stream>>>(
          args, gp, dx.mutable_data_ptr<scalar_t>(), L.batch, L.channels, L.size[0],
          L.size[1], L.size[2], L.num_tokens, L.dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[1] && w_total > 0) {
      grad_weight_kernel<scalar_t, acc_t><<<num_blocks(w_total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), args, gp, gptr, L.batch,
          L.num_tokens, L.dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[2]) {
      grad_bias_kernel<scalar_t, acc_t><<<num_blocks(n_tubes * L.dim), kThreads, 0, stream>>>(
          args, gp, gptr, L.batch, L.num_tokens, L.dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dx, dws, dbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit, CUDA, m) {
  m.impl("tube_tokens", &tube_tokens_cuda);
  m.impl("tube_tokens_backward", &tube_tokens_backward_cuda);
}

}  // namespace tubevit
