// The correctness-first ("naive") kernels, written once as per-element
// functors (TUBEVIT_HD: host + device) and driven by a launcher policy:
//   * cuda/tube_tokens_cuda.cu runs them as grid-stride CUDA kernels (the
//     launcher of cuda/cuda_launcher.cuh) — the CUDA path where neither fast
//     path applies (fp64, fp32 with TF32 convolutions off but TF32 matmuls
//     on, TUBEVIT_CUDA_PATH=naive); testing/naive_cuda.cu registers them as
//     the op tubevit_testing::tube_tokens_naive the fast paths are tested
//     against;
//   * testing/naive_cpu.cpp runs the very same functors in a host loop as
//     the same test op, so the index arithmetic of the GPU kernels is
//     exercised by the CPU test suite on machines with no GPU.
//
// One thread (or loop iteration) per output element, no atomics: results are
// deterministic. Accumulation (NaiveAcc): fp32 for half/bf16, fp64 for fp32
// and fp64. Each output element is one long sequential sum (dW: all B x n_i
// tokens), whose fp32 rounding error grows with its length: on an H200 a dW
// summed over 216 tokens in fp32 was 3.2e-5 off, 7x cuDNN's error (which sums
// in blocks). These kernels are the exact reference path, so they sum in fp64.
// Input gradient is computed in gather form (each voxel sums over the
// tokens whose windows cover it, see axis_covering), so overlapping tubes
// need no atomics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "tube_tokens.h"

namespace tubevit {
namespace naive {

template <typename scalar_t>
using NaiveAcc = typename std::conditional<std::is_same<scalar_t, float>::value, double,
                                           at::opmath_type<scalar_t>>::type;

// Tube geometry and weight pointers passed by value (CUDA kernel parameter
// space, < 4 KiB for kMaxTubes = 16).
template <typename scalar_t>
struct TubeArgs {
  TubeGeom g[kMaxTubes];
  const scalar_t* w[kMaxTubes];     // (d, K) row-major per tube
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

TUBEVIT_HD int find_tube_by_token(const TubeGeom* g, int n_tubes, int64_t token) {
  int i = 0;
  while (i + 1 < n_tubes && token >= g[i + 1].token_offset) ++i;
  return i;
}

// out[b, tok, j] = sum_k P[b, tok, k] * W[j, k] + bias[j] + pe[tok, j]
// Element index: ((b * N) + token) * d + j (the contiguous output).
template <typename scalar_t, typename acc_t>
struct ForwardElem {
  const scalar_t* x;
  Strides5 xs;
  TubeArgs<scalar_t> args;
  const scalar_t* pe;  // (N, d) contiguous or nullptr
  scalar_t* out;       // (B, N, d) contiguous
  int64_t N, d, C;

  TUBEVIT_HD void operator()(int64_t idx) const {
    const int64_t j = idx % d;
    const int64_t token = (idx / d) % N;
    const int64_t b = idx / (d * N);
    const int i = find_tube_by_token(args.g, args.n_tubes, token);
    const TubeGeom& g = args.g[i];
    const int64_t tok = token - g.token_offset;
    const scalar_t* src0 = x + b * xs.b + token_origin_offset(g, tok, xs.t, xs.h, xs.w);
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
};

// dW[i][j, k] = sum_{b, tok} G[b, off_i + tok, j] * P_i[b, tok, k]
// Element index: flat over tubes, w_offset[i] + j * K_i + k.
template <typename scalar_t, typename acc_t>
struct GradWeightElem {
  const scalar_t* x;
  Strides5 xs;
  TubeArgs<scalar_t> args;
  const scalar_t* grad;  // (B, N, d) contiguous
  GradPtrs<scalar_t> out;
  int64_t B, N, d;

  TUBEVIT_HD void operator()(int64_t idx) const {
    int i = 0;
    while (i + 1 < args.n_tubes && idx >= args.w_offset[i + 1]) ++i;
    const TubeGeom& g = args.g[i];
    const int64_t local = idx - args.w_offset[i];
    const int64_t j = local / g.patch_size, k = local % g.patch_size;
    // column k's voxel in the grid's first token; tokens step by s * stride
    const int64_t col = token_origin_offset(g, 0, xs.t, xs.h, xs.w) +
                        patch_column_offset(g, k, xs.c, xs.t, xs.h, xs.w);
    acc_t acc = 0;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* xb = x + b * xs.b + col;
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
};

// db[i][j] = sum_{b, tok} G[b, off_i + tok, j]. Element index: i * d + j.
template <typename scalar_t, typename acc_t>
struct GradBiasElem {
  TubeArgs<scalar_t> args;
  const scalar_t* grad;
  GradPtrs<scalar_t> out;
  int64_t B, N, d;

  TUBEVIT_HD void operator()(int64_t idx) const {
    const int i = static_cast<int>(idx / d);
    const int64_t j = idx % d;
    const TubeGeom& g = args.g[i];
    acc_t acc = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t tok = 0; tok < g.num_tokens; ++tok)
        acc += static_cast<acc_t>(grad[(b * N + g.token_offset + tok) * d + j]);
    out.db[i][j] = static_cast<scalar_t>(acc);
  }
};

// dx[b, c, t, h, w] = sum over tubes and covering tokens of G[token, :] . W[:, c, dt, dh, dw]
// Element index: contiguous (B, C, T, H, W).
template <typename scalar_t, typename acc_t>
struct GradInputElem {
  TubeArgs<scalar_t> args;
  const scalar_t* grad;
  scalar_t* dx;
  int64_t C, T, H, W, N, d;

  TUBEVIT_HD void operator()(int64_t idx) const {
    const int64_t w = idx % W;
    const int64_t h = (idx / W) % H;
    const int64_t t = (idx / (W * H)) % T;
    const int64_t c = (idx / (W * H * T)) % C;
    const int64_t b = idx / (W * H * T * C);
    acc_t acc = 0;
    for (int i = 0; i < args.n_tubes; ++i) {
      const TubeGeom& g = args.g[i];
      for_each_covering(g, c, t, h, w, [&](int64_t tok, int64_t k) {
        const scalar_t* gr = grad + (b * N + g.token_offset + tok) * d;
        const scalar_t* wc = args.w[i] + k;
        for (int64_t jj = 0; jj < d; ++jj)
          acc += static_cast<acc_t>(gr[jj]) * static_cast<acc_t>(wc[jj * g.patch_size]);
      });
    }
    dx[idx] = static_cast<scalar_t>(acc);
  }
};

// ---- host-side drivers, shared by both launchers ---------------------------

// Fills geometry and weight pointers; `w` and `bias` must be contiguous.
template <typename scalar_t>
TubeArgs<scalar_t> make_args(const TubeLayout& L, const std::vector<at::Tensor>& w,
                             const std::vector<at::Tensor>& bias) {
  TORCH_CHECK(L.tubes.size() <= size_t(kMaxTubes), "this kernel supports at most ", kMaxTubes,
              " tubes, got ", L.tubes.size());
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

// Launcher: a type with `template <class F> static void run(int64_t n, const F& f)`
// that calls f(i) for every i in [0, n) (n > 0).
template <class Launcher>
at::Tensor forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                   at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  const auto w = contiguous_all(weights);
  const auto bias = contiguous_all(biases);
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_naive", [&] {
    using acc_t = NaiveAcc<scalar_t>;
    const ForwardElem<scalar_t, acc_t> f{x.const_data_ptr<scalar_t>(), strides_of(x),
                                         make_args<scalar_t>(L, w, bias),
                                         pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr,
                                         out.mutable_data_ptr<scalar_t>(), L.num_tokens, L.dim,
                                         L.channels};
    Launcher::run(out.numel(), f);
  });
  return out;
}

template <class Launcher>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
    at::IntArrayRef tubes, std::array<bool, 3> output_mask) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  const auto w = contiguous_all(weights);
  const at::Tensor grad = grad_out.contiguous();
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_naive_backward", [&] {
    using acc_t = NaiveAcc<scalar_t>;
    const auto args = make_args<scalar_t>(L, w, {});
    GradPtrs<scalar_t> gptr{};
    for (int64_t i = 0; i < n_tubes; ++i) {
      if (output_mask[1]) gptr.dw[i] = dws[i].mutable_data_ptr<scalar_t>();
      if (output_mask[2]) gptr.db[i] = dbs[i].mutable_data_ptr<scalar_t>();
    }
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    if (output_mask[0] && dx.numel() > 0) {
      Launcher::run(dx.numel(), GradInputElem<scalar_t, acc_t>{args, gp, dx.mutable_data_ptr<scalar_t>(),
                                                               L.channels, L.size[0], L.size[1],
                                                               L.size[2], L.num_tokens, L.dim});
    }
    if (output_mask[1] && w_total > 0) {
      Launcher::run(w_total, GradWeightElem<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), strides_of(x),
                                                             args, gp, gptr, L.batch, L.num_tokens, L.dim});
    }
    if (output_mask[2]) {
      Launcher::run(n_tubes * L.dim,
                    GradBiasElem<scalar_t, acc_t>{args, gp, gptr, L.batch, L.num_tokens, L.dim});
    }
  });
  return {dx, dws, dbs};
}

}  // namespace naive
}  // namespace tubevit
